// Test entry point: death tests fork from a process that has threads (IoThreads, the main
// context), so they must re-execute the binary ("threadsafe" style).
#include <gtest/gtest.h>

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  return RUN_ALL_TESTS();
}
