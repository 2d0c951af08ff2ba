// cpu_relax(): the processor's spin-wait hint, for bounded busy-wait loops.
// Thread-safety: a pure instruction; callable anywhere.
#pragma once

namespace spindle::base {

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace spindle::base
