// Qcow2NodeFixture<Base>: a gtest fixture (Base: testing::Test or TestWithParam<...>) for tests
// that open qcow2 images as Qcow2Nodes: a temporary directory for the images, a context to run
// coroutines on, and open() through the qcow2 driver (no backing files).
//
// Thread-safety: use from the test's thread; the nodes follow their own contracts.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "aio/context.h"
#include "block/drivers/file.h"
#include "block/formats/qcow2/qcow2_node.h"
#include "coro/block_on.h"
#include "coro/task.h"
#include "support/temp_dir.h"

namespace spindle::test {

template <typename Base>
class Qcow2NodeFixture : public Base {
 protected:
  explicit Qcow2NodeFixture(const std::string& prefix) : temp_(prefix) {}

  std::string path(const std::string& name) const { return temp_.path(name); }

  template <typename T>
  T run(coro::Task<T> task) {
    return coro::block_on(*context_, std::move(task));
  }

  std::shared_ptr<block::qcow2::Qcow2Node> open(const std::string& name, bool read_only = false) {
    base::Result<block::BlockNodeRef> file = block::open_file(path(name), read_only);
    EXPECT_TRUE(file.ok());
    if (!file.ok()) return nullptr;
    block::FormatOpenOptions options;
    options.read_only = read_only;
    block::BlockResult<block::BlockNodeRef> node =
        run(block::qcow2::open_qcow2(file.value(), std::move(options)));
    EXPECT_TRUE(node.ok()) << node.error().message;
    if (!node.ok()) return nullptr;
    return std::dynamic_pointer_cast<block::qcow2::Qcow2Node>(node.value());
  }

  TempDir temp_;
  aio::ContextRef context_ = aio::Context::create("qcow2-node-test");
};

}  // namespace spindle::test
