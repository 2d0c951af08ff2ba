// Spindle runtime micro-benchmarks, each paired with standalone Asio 1.22 doing the same work in
// the same binary (same compiler, flags and machine state). Rows, named Spindle/<Row> and
// Asio/<Row>; the summary's ns/op is wall time per the operation in brackets:
//  1. Lifecycle [one coroutine]: create, run and finish an empty coroutine.
//       Spindle: enter(create(empty_task())).   Asio: co_spawn() + io_context::poll().
//  2. Yield round trip [one suspend + resume], single thread:
//       Spindle/Yield/ResumeSuspend: a root loops on co_await suspend() and the benchmark loop
//         enter()s it (QEMU's /perf/yield).
//       Spindle/Yield/ViaLoop: co_await yield() on a private Context; the loop calls poll(false).
//       Asio/Yield/PostRunOne: co_await post(use_awaitable) to its own io_context; the loop
//         calls run_one().
//  3. AwaitChain1000 [one whole chain]: recursive Task<int> / awaitable<int> depth(1000) started
//     and run to completion; the console also shows ns_per_await.
//  4. BH [one schedule + run]: Spindle BottomHalf::schedule() + poll(false) (SchedulePoll) and
//     run_soon() + poll(false) (RunSoonPoll); Asio post() + poll(). Posted from outside a poll.
//  5. Timer/ArmCancel [one arm + cancel] of a 1 s timer; Asio must also run the aborted handler.
//  6. PingPong [one round trip]: a coroutine hops to a second event-loop thread and back, both
//     threads busy-polling (TargetPolls) or sleeping in the kernel when idle (TargetAsleep).
//  7. FanIn/2Producers [one item]: 2 producer threads post 20000 callbacks each to one
//     event-loop thread.
//
// Run:   build-bench/bench/spindle-runtime-bench          about 40 s on the 2-core VM
//        ... --benchmark_min_time=0.05                    quicker, noisier
//        ... --benchmark_filter=PingPong                  a subset (regex, case-sensitive)
//        ... --benchmark_repetitions=9                    more repetitions (default 5)
//        ... --benchmark_enable_random_interleaving=true  repetitions of all rows interleaved
// Google Benchmark flags pass through. Without --benchmark_min_time (or BENCHMARK_MIN_TIME in
// the environment) every row runs for at least 0.2 s per repetition, and without
// --benchmark_repetitions (or BENCHMARK_REPETITIONS) 5 times. At the end a summary table pairs
// each Spindle row with its Asio row: the median ns/op of each, and the ratio Asio/Spindle of
// each repetition pair (repetition i of both rows) as its median and min-max; a row meets its
// goals when the median ratio is >= 1 and the median ns/op is within the absolute goal. Every
// benchmark verifies that it did the work it claims; the exit status is 1 if one of those
// checks failed.
#include <benchmark/benchmark.h>
#include <fmt/core.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <future>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "aio/bottom_half.h"
#include "aio/context.h"
#include "aio/io_thread.h"
#include "aio/timer.h"
#include "asio_support.h"
#include "coro/block_on.h"
#include "coro/coroutine.h"
#include "coro/task.h"
#include "summary_table.h"

namespace {

namespace aio = spindle::aio;
namespace coro = spindle::coro;
using namespace std::chrono_literals;
using spindle::bench::add;
using spindle::bench::AsioTask;
using spindle::bench::AsioThread;
using spindle::bench::check;
using spindle::bench::kUseAwaitable;
using SteadyClock = std::chrono::steady_clock;

constexpr int kChainDepth = 1000;
constexpr int kRoundTripsWhenPolling = 1000;
constexpr int kRoundTripsWhenAsleep = 200;
constexpr int kProducers = 2;
constexpr int kItemsPerProducer = 20000;

// ---- helpers ------------------------------------------------------------------------------

// Adds a console counter `name` = wall ns per operation, for rows that batch many operations
// into one benchmark iteration (the summary computes the same figure from the reported time).
void set_ns_per_operation(benchmark::State& state, SteadyClock::time_point loop_start,
                          double operations_per_iteration, const char* name) {
  const double elapsed_ns =
      std::chrono::duration<double, std::nano>(SteadyClock::now() - loop_start).count();
  state.counters[name] =
      elapsed_ns / (static_cast<double>(state.iterations()) * operations_per_iteration);
}

// Threads a ping-pong coroutine ran on, recorded once per benchmark to prove each hop really
// changed thread (null during the timed runs).
using HopLog = std::vector<std::thread::id>;
void log_hop(HopLog* log) {
  if (log) log->push_back(std::this_thread::get_id());
}
bool hops_alternate(const HopLog& log, std::thread::id home, std::thread::id peer) {
  return log == HopLog{home, peer, home, peer, home};
}

// ---- 1. coroutine lifecycle ---------------------------------------------------------------

coro::Task<void> empty_task() { co_return; }

void spindle_coroutine_lifecycle(benchmark::State& state) {
  // The benchmark thread is the main thread, whose current context is main_context().
  for (auto _ : state) coro::enter(coro::create(empty_task()));
}

AsioTask<void> asio_empty_task() { co_return; }

// The cheapest honest Asio equivalent: co_spawn() runs the entry point until it dispatches the
// body to the io_context, and poll() runs the body and the completion handler. A concurrency
// hint of 1 is Asio's single-thread fast path; the work guard saves a restart() per iteration.
void asio_coroutine_lifecycle(benchmark::State& state) {
  asio::io_context io(1);
  auto work_guard = asio::make_work_guard(io);
  std::int64_t finished = 0;
  for (auto _ : state) {
    asio::co_spawn(io, asio_empty_task(), [&finished](std::exception_ptr) { ++finished; });
    io.poll();
  }
  check(state, finished == state.iterations(), "not every coroutine finished within its poll()");
}

// ---- 2. yield round trip ------------------------------------------------------------------

coro::Task<void> suspend_loop(const bool& stop, std::int64_t& resumes) {
  for (;;) {
    co_await coro::suspend();
    if (stop) co_return;
    ++resumes;
  }
}

void spindle_yield_resume_suspend(benchmark::State& state) {
  bool stop = false;
  std::int64_t resumes = 0;
  coro::Coroutine* co = coro::create(suspend_loop(stop, resumes));
  coro::enter(co);  // runs to the first suspend
  for (auto _ : state) coro::enter(co);
  stop = true;
  coro::enter(co);  // finishes and frees the detached root
  check(state, resumes == state.iterations(), "resume count mismatch");
}

coro::Task<void> yield_loop(const bool& stop, std::int64_t& yields) {
  while (!stop) {
    co_await coro::yield();
    ++yields;
  }
}

void spindle_yield_via_loop(benchmark::State& state) {
  aio::ContextRef context = aio::Context::create("bench-yield");
  bool stop = false;
  std::int64_t yields = 0;
  coro::spawn(*context, yield_loop(stop, yields));
  context->poll(false);  // starts it; it yields once
  for (auto _ : state) context->poll(false);
  stop = true;
  while (context->poll(false)) {  // the last resume sees `stop` and finishes
  }
  check(state, yields == state.iterations() + 1, "one poll(false) must run exactly one yield");
}

// post(token) completes on the token's associated executor: the coroutine's own io_context.
AsioTask<void> asio_post_loop(const bool& stop, std::int64_t& posts) {
  while (!stop) {
    co_await asio::post(kUseAwaitable);
    ++posts;
  }
}

void asio_yield_post_run_one(benchmark::State& state) {
  asio::io_context io(1);
  auto work_guard = asio::make_work_guard(io);
  bool stop = false;
  bool finished = false;
  std::int64_t posts = 0;
  asio::co_spawn(io, asio_post_loop(stop, posts), [&finished](std::exception_ptr) {
    finished = true;
  });
  while (posts == 0) io.run_one();  // past co_spawn's own dispatch, into the loop
  const std::int64_t posts_before = posts;
  for (auto _ : state) io.run_one();
  const std::int64_t posts_timed = posts - posts_before;
  stop = true;
  while (!finished) io.run_one();
  check(state, posts_timed == state.iterations(), "one run_one() must run exactly one post");
}

// ---- 3. chain of nested awaits ------------------------------------------------------------

coro::Task<int> spindle_depth(int n) {
  if (n == 0) co_return 0;
  co_return co_await spindle_depth(n - 1) + 1;
}

void spindle_await_chain(benchmark::State& state) {
  int result = 0;
  const auto loop_start = SteadyClock::now();
  // block_on() on the main thread's own context (main_context()) polls it until done.
  for (auto _ : state) result = coro::block_on(spindle_depth(kChainDepth));
  set_ns_per_operation(state, loop_start, kChainDepth, "ns_per_await");
  check(state, result == kChainDepth, "wrong chain result");
}

AsioTask<int> asio_depth(int n) {
  if (n == 0) co_return 0;
  co_return co_await asio_depth(n - 1) + 1;
}

void asio_await_chain(benchmark::State& state) {
  asio::io_context io(1);
  auto work_guard = asio::make_work_guard(io);
  int result = 0;
  std::int64_t finished = 0;
  const auto loop_start = SteadyClock::now();
  for (auto _ : state) {
    asio::co_spawn(io, asio_depth(kChainDepth), [&](std::exception_ptr, int value) {
      result = value;
      ++finished;
    });
    io.poll();
  }
  set_ns_per_operation(state, loop_start, kChainDepth, "ns_per_await");
  check(state, finished == state.iterations() && result == kChainDepth, "chain did not finish");
}

// ---- 4. posted callback (bottom half) -----------------------------------------------------

void spindle_bh_schedule_poll(benchmark::State& state) {
  aio::ContextRef context = aio::Context::create("bench-bh");
  std::int64_t runs = 0;
  aio::BottomHalf* bh = aio::BottomHalf::create(*context, [&runs] { ++runs; }, "bench-bh");
  for (auto _ : state) {
    bh->schedule();
    context->poll(false);
  }
  bh->destroy();
  check(state, runs == state.iterations(), "bottom half run count mismatch");
}

void spindle_bh_run_soon_poll(benchmark::State& state) {
  aio::ContextRef context = aio::Context::create("bench-run-soon");
  std::int64_t runs = 0;
  for (auto _ : state) {
    context->run_soon([&runs] { ++runs; });
    context->poll(false);
  }
  check(state, runs == state.iterations(), "run_soon run count mismatch");
}

void asio_bh_post_poll(benchmark::State& state) {
  asio::io_context io(1);
  auto work_guard = asio::make_work_guard(io);  // else poll() stops io and needs restart()
  std::int64_t runs = 0;
  for (auto _ : state) {
    asio::post(io, [&runs] { ++runs; });
    io.poll();
  }
  check(state, runs == state.iterations(), "post run count mismatch");
}

// ---- 5. timer arm + cancel ----------------------------------------------------------------

void spindle_timer_arm_cancel(benchmark::State& state) {
  // main_context() is the benchmark thread's own context. Arming from the home thread is the
  // common case (a coroutine arming its own timeout) and needs no wake-up of a sleeping poll().
  std::int64_t fired = 0;
  aio::Timer timer(aio::main_context(), aio::Clock::monotonic, [&fired] { ++fired; });
  for (auto _ : state) {
    timer.arm_in(1s);
    timer.cancel();
  }
  check(state, fired == 0 && !timer.armed(), "timer fired or stayed armed");
}

void asio_timer_arm_cancel(benchmark::State& state) {
  asio::io_context io(1);
  auto work_guard = asio::make_work_guard(io);
  asio::steady_timer timer(io);
  std::int64_t aborted = 0;
  for (auto _ : state) {
    timer.expires_after(1s);
    timer.async_wait([&aborted](const std::error_code& error) {
      if (error == asio::error::operation_aborted) ++aborted;
    });
    timer.cancel();
    // Unlike Spindle's cancel(), Asio's owes the waiter a completion: the aborted handler must
    // run (and be paid for) before the timer is idle again.
    io.poll();
  }
  check(state, aborted == state.iterations(), "aborted handler count mismatch");
}

// ---- 6. cross-thread ping-pong ------------------------------------------------------------

coro::Task<void> spindle_pingpong(aio::Context& home, aio::Context& peer, int round_trips,
                                  HopLog* log) {
  log_hop(log);
  for (int i = 0; i < round_trips; ++i) {
    co_await coro::switch_to(peer);
    log_hop(log);
    co_await coro::switch_to(home);
    log_hop(log);
  }
}

void spindle_pingpong_bench(benchmark::State& state, aio::Context::PollParams poll_params,
                            int round_trips) {
  aio::IoThread home("bench-ping", poll_params);
  aio::IoThread peer("bench-pong", poll_params);
  HopLog log;
  coro::block_on(home.context(), spindle_pingpong(home.context(), peer.context(), 2, &log));
  if (!hops_alternate(log, home.thread_id(), peer.thread_id())) {
    state.SkipWithError("switch_to() did not alternate threads");
    return;
  }
  const auto loop_start = SteadyClock::now();
  for (auto _ : state) {
    coro::block_on(home.context(),
                   spindle_pingpong(home.context(), peer.context(), round_trips, nullptr));
  }
  set_ns_per_operation(state, loop_start, round_trips, "ns_per_roundtrip");
}  // ~IoThread stops and joins both threads before their contexts go away

// Asio 1.22 has no switch_to(): binding use_awaitable to another executor makes post() complete
// there, and the completion resumes the coroutine in the thread that runs it (checked below).
// post(peer_executor, use_awaitable) would NOT do it: the completion is still dispatched to the
// coroutine's own executor, so the body never leaves home.
AsioTask<void> asio_pingpong(asio::io_context& home, asio::io_context& peer, int round_trips,
                             HopLog* log) {
  log_hop(log);
  for (int i = 0; i < round_trips; ++i) {
    co_await asio::post(asio::bind_executor(peer, kUseAwaitable));
    log_hop(log);
    co_await asio::post(asio::bind_executor(home, kUseAwaitable));
    log_hop(log);
  }
}

void asio_pingpong_bench(benchmark::State& state, AsioThread::Mode mode, int round_trips) {
  AsioThread home(mode);
  AsioThread peer(mode);
  HopLog log;
  asio::co_spawn(home.io(), asio_pingpong(home.io(), peer.io(), 2, &log), asio::use_future)
      .get();
  if (!hops_alternate(log, home.thread_id(), peer.thread_id())) {
    state.SkipWithError("Asio hops did not alternate threads");
    return;
  }
  const auto loop_start = SteadyClock::now();
  for (auto _ : state) {
    asio::co_spawn(home.io(), asio_pingpong(home.io(), peer.io(), round_trips, nullptr),
                   asio::use_future)
        .get();
  }
  set_ns_per_operation(state, loop_start, round_trips, "ns_per_roundtrip");
}

// ---- 7. N->1 cross-thread fan-in ----------------------------------------------------------

// Starts kProducers threads that each call post_one() kItemsPerProducer times, joins them, then
// waits until the target has run everything (a last item, queued after all others, says so).
// Thread start-up (tens of us) is timed too: under 1% of an iteration.
template <typename PostOne, typename PostLast>
void run_fan_in(PostOne post_one, PostLast post_last) {
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&post_one] {
      for (int i = 0; i < kItemsPerProducer; ++i) post_one();
    });
  }
  for (auto& producer : producers) producer.join();
  std::promise<void> drained;
  post_last([&drained] { drained.set_value(); });
  drained.get_future().wait();
}

constexpr std::int64_t kItemsPerFanIn = std::int64_t{kProducers} * kItemsPerProducer;

void spindle_fan_in(benchmark::State& state) {
  aio::IoThread target("bench-target");
  std::int64_t received = 0;  // touched only by the target's thread until it is drained
  aio::Context& context = target.context();
  for (auto _ : state) {
    run_fan_in([&] { context.run_soon([&received] { ++received; }); },
               [&](auto last) { context.run_soon(std::move(last)); });
  }
  state.SetItemsProcessed(state.iterations() * kItemsPerFanIn);
  check(state, received == state.iterations() * kItemsPerFanIn, "lost items");
}

void asio_fan_in(benchmark::State& state) {
  AsioThread target(AsioThread::Mode::sleep);  // io.run(): Asio's usual consumer thread
  std::int64_t received = 0;
  asio::io_context& io = target.io();
  for (auto _ : state) {
    run_fan_in([&] { asio::post(io, [&received] { ++received; }); },
               [&](auto last) { asio::post(io, std::move(last)); });
  }
  state.SetItemsProcessed(state.iterations() * kItemsPerFanIn);
  check(state, received == state.iterations() * kItemsPerFanIn, "lost items");
}

// ---- registration and summary -------------------------------------------------------------

void register_benchmarks() {
  // Spindle and Asio alternate row by row, so both see similar machine conditions.
  add("Spindle/Lifecycle", 1, spindle_coroutine_lifecycle);
  add("Asio/Lifecycle", 1, asio_coroutine_lifecycle);
  add("Spindle/Yield/ResumeSuspend", 1, spindle_yield_resume_suspend);
  add("Spindle/Yield/ViaLoop", 1, spindle_yield_via_loop);
  add("Asio/Yield/PostRunOne", 1, asio_yield_post_run_one);
  add("Spindle/AwaitChain1000", 1, spindle_await_chain);
  add("Asio/AwaitChain1000", 1, asio_await_chain);
  add("Spindle/BH/SchedulePoll", 1, spindle_bh_schedule_poll);
  add("Spindle/BH/RunSoonPoll", 1, spindle_bh_run_soon_poll);
  add("Asio/BH/PostPoll", 1, asio_bh_post_poll);
  add("Spindle/Timer/ArmCancel", 1, spindle_timer_arm_cancel);
  add("Asio/Timer/ArmCancel", 1, asio_timer_arm_cancel);

  // The caller sleeps in block_on()/future::get() while two other threads work: wall time.
  constexpr aio::Context::PollParams kBusyPoll{1'000'000, 0, 0};
  constexpr aio::Context::PollParams kNoPoll{0, 0, 0};
  add("Spindle/PingPong/TargetPolls", kRoundTripsWhenPolling, spindle_pingpong_bench, kBusyPoll,
      kRoundTripsWhenPolling)
      ->UseRealTime();
  add("Asio/PingPong/TargetPolls", kRoundTripsWhenPolling, asio_pingpong_bench,
      AsioThread::Mode::busy_poll, kRoundTripsWhenPolling)
      ->UseRealTime();
  add("Spindle/PingPong/TargetAsleep", kRoundTripsWhenAsleep, spindle_pingpong_bench, kNoPoll,
      kRoundTripsWhenAsleep)
      ->UseRealTime();
  add("Asio/PingPong/TargetAsleep", kRoundTripsWhenAsleep, asio_pingpong_bench,
      AsioThread::Mode::sleep, kRoundTripsWhenAsleep)
      ->UseRealTime();
  add("Spindle/FanIn/2Producers", kItemsPerFanIn, spindle_fan_in)->UseRealTime();
  add("Asio/FanIn/2Producers", kItemsPerFanIn, asio_fan_in)->UseRealTime();
}

struct SummaryRow {
  const char* label;
  const char* spindle;
  const char* asio;
  std::optional<double> goal_ns;  // absolute goal for the Spindle row, besides "<= Asio"
};

constexpr SummaryRow kSummaryRows[] = {
    {"coroutine lifecycle", "Spindle/Lifecycle", "Asio/Lifecycle", 60},
    {"yield: resume+suspend", "Spindle/Yield/ResumeSuspend", "Asio/Yield/PostRunOne", 10},
    {"yield: via loop", "Spindle/Yield/ViaLoop", "Asio/Yield/PostRunOne", {}},
    {"await chain x1000 (per chain)", "Spindle/AwaitChain1000", "Asio/AwaitChain1000", {}},
    {"BH schedule+poll", "Spindle/BH/SchedulePoll", "Asio/BH/PostPoll", {}},
    {"run_soon+poll", "Spindle/BH/RunSoonPoll", "Asio/BH/PostPoll", {}},
    {"timer arm+cancel", "Spindle/Timer/ArmCancel", "Asio/Timer/ArmCancel", {}},
    {"ping-pong, target polls", "Spindle/PingPong/TargetPolls", "Asio/PingPong/TargetPolls",
     1000},
    {"ping-pong, target asleep", "Spindle/PingPong/TargetAsleep", "Asio/PingPong/TargetAsleep",
     {}},
    {"fan-in 2->1 (per item)", "Spindle/FanIn/2Producers", "Asio/FanIn/2Producers", {}},
};

// Pairs each Spindle row with its Asio row and checks the goals.
void print_summary(const spindle::bench::SummaryReporter& results) {
  using spindle::bench::format_value;
  using spindle::bench::ratio_spread;
  using spindle::bench::spread_of;
  fmt::print("\nSummary (wall ns per operation, median over repetitions; ratio = Asio / Spindle "
             "per repetition pair, its median and min-max; > 1 means Spindle is faster)\n");
  spindle::bench::Table table({{"row", 30, true},
                               {"Spindle ns/op", 13},
                               {"Asio ns/op", 13},
                               {"ratio", 6},
                               {"ratio min-max", 13},
                               {"runs", 4},
                               {"goal", 19, true},
                               {"met?"}});
  for (const SummaryRow& row : kSummaryRows) {
    const std::vector<double> spindle_runs = results.ns_per_operation_runs(row.spindle);
    const std::vector<double> asio_runs = results.ns_per_operation_runs(row.asio);
    const auto spindle = spread_of(spindle_runs);
    const auto asio = spread_of(asio_runs);
    if (!spindle && !asio) continue;  // filtered out
    const auto ratio = ratio_spread(asio_runs, spindle_runs);
    const std::string goal =
        row.goal_ns ? fmt::format("<= {:g} ns, <= Asio", *row.goal_ns) : "<= Asio";
    std::string met = "n/a";
    if (ratio) {
      const bool ok = ratio->median >= 1 && (!row.goal_ns || spindle->median <= *row.goal_ns);
      met = ok ? "yes" : "NO";
    }
    const auto median = [](const std::optional<spindle::bench::Spread>& s) {
      return s ? std::optional<double>(s->median) : std::nullopt;
    };
    table.add_row({row.label, format_value(median(spindle)), format_value(median(asio)),
                   ratio ? fmt::format("{:.2f}", ratio->median) : "-",
                   ratio ? fmt::format("{:.2f}-{:.2f}", ratio->min, ratio->max) : "-",
                   ratio ? fmt::format("{}", ratio->count) : "-", goal, met});
  }
  table.print();
}

}  // namespace

int main(int argc, char** argv) {
  return spindle::bench::run_benchmarks(argc, argv, "0.2", register_benchmarks, print_summary,
                                        /*default_repetitions=*/5);
}
