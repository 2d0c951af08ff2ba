// Shared plumbing of the benchmark programs: registering a benchmark together with the number
// of operations one iteration performs, a console reporter that also remembers every result
// (wall time per operation, user counters, failures) for a summary printed after the run, a
// fixed-width text table for that summary, the median and spread of per-repetition figures, and
// a main() that defaults to a short minimum time (and, if asked, to several repetitions).
//
// Thread-safety: everything here runs on the benchmark (main) thread.
#pragma once

#include <benchmark/benchmark.h>
#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace spindle::bench {

// Operations one iteration of each benchmark performs; the summary reports time per operation.
inline std::map<std::string, double, std::less<>>& operations_per_iteration() {
  static std::map<std::string, double, std::less<>> table;
  return table;
}

// Registers `function(state, args...)` as benchmark `name`, one iteration being `operations`
// operations.
template <typename Function, typename... Args>
benchmark::internal::Benchmark* add(const std::string& name, double operations,
                                    Function function, Args... args) {
  operations_per_iteration()[name] = operations;
  return benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& state) {
    function(state, args...);
  });
}

// Marks the run as failed (the program then exits with status 1) unless `ok`.
inline void check(benchmark::State& state, bool ok, const char* what) {
  if (!ok) state.SkipWithError(what);
}

// The usual console output, plus what the summary needs: wall time per operation and the user
// counters of every benchmark (means over repetitions when there are several).
class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  explicit SummaryReporter(OutputOptions options) : ConsoleReporter(options) {}

  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.error_occurred) {
        failed_ = true;
        continue;
      }
      Totals& totals = totals_[run.run_name.function_name];
      if (run.run_type == Run::RT_Iteration) {
        totals.seconds += run.real_accumulated_time;
        totals.iterations += static_cast<double>(run.iterations);
        ++totals.runs;
        if (run.iterations > 0) {
          totals.ns_per_iteration_runs.push_back(run.real_accumulated_time * 1e9 /
                                                 static_cast<double>(run.iterations));
        }
        for (const auto& [name, counter] : run.counters) totals.counter_sums[name] += counter.value;
      } else if (run.aggregate_name == "mean") {  // --benchmark_repetitions: use the mean
        totals.mean_ns_per_iteration =
            run.GetAdjustedRealTime() * 1e9 / benchmark::GetTimeUnitMultiplier(run.time_unit);
      }
    }
    ConsoleReporter::ReportRuns(runs);
  }

  bool failed() const noexcept { return failed_; }
  bool empty() const noexcept { return totals_.empty(); }

  // Wall nanoseconds per operation (see operations_per_iteration()).
  std::optional<double> ns_per_operation(std::string_view name) const {
    const auto found = totals_.find(name);
    const auto operations = operations_per_iteration().find(name);
    if (found == totals_.end() || operations == operations_per_iteration().end()) {
      return std::nullopt;
    }
    const Totals& totals = found->second;
    if (totals.mean_ns_per_iteration) return *totals.mean_ns_per_iteration / operations->second;
    if (totals.iterations == 0) return std::nullopt;
    return totals.seconds * 1e9 / (totals.iterations * operations->second);
  }

  // Wall nanoseconds per operation of each repetition, in the order they ran (one entry
  // without --benchmark_repetitions).
  std::vector<double> ns_per_operation_runs(std::string_view name) const {
    const auto found = totals_.find(name);
    const auto operations = operations_per_iteration().find(name);
    if (found == totals_.end() || operations == operations_per_iteration().end()) return {};
    std::vector<double> runs;
    for (const double ns : found->second.ns_per_iteration_runs) {
      runs.push_back(ns / operations->second);
    }
    return runs;
  }

  // Operations per second of wall time.
  std::optional<double> operations_per_second(std::string_view name) const {
    const std::optional<double> ns = ns_per_operation(name);
    if (!ns || *ns <= 0) return std::nullopt;
    return 1e9 / *ns;
  }

  // The user counter `counter` of benchmark `name`: its mean over the reported runs.
  std::optional<double> counter(std::string_view name, std::string_view counter) const {
    const auto found = totals_.find(name);
    if (found == totals_.end() || found->second.runs == 0) return std::nullopt;
    const auto sum = found->second.counter_sums.find(counter);
    if (sum == found->second.counter_sums.end()) return std::nullopt;
    return sum->second / found->second.runs;
  }

 private:
  struct Totals {
    double seconds = 0;
    double iterations = 0;
    int runs = 0;
    std::vector<double> ns_per_iteration_runs;  // one per repetition
    std::map<std::string, double, std::less<>> counter_sums;
    std::optional<double> mean_ns_per_iteration;
  };

  std::map<std::string, Totals, std::less<>> totals_;
  bool failed_ = false;
};

// A text table: a header, a line of dashes, then the rows; cells are separated by " | ".
// A column of width 0 is not padded (for the last one).
class Table {
 public:
  struct Column {
    std::string header;
    std::size_t width = 0;
    bool align_left = false;
  };

  explicit Table(std::vector<Column> columns) : columns_(std::move(columns)) {}

  void add_row(std::vector<std::string> cells) { rows_.push_back(std::move(cells)); }
  bool empty() const noexcept { return rows_.empty(); }

  void print() const {
    std::vector<std::string> headers;
    std::vector<std::string> dashes;
    for (const Column& column : columns_) {
      headers.push_back(column.header);
      dashes.emplace_back(column.width ? column.width : column.header.size(), '-');
    }
    print_line(headers);
    print_line(dashes);
    for (const auto& row : rows_) print_line(row);
  }

 private:
  void print_line(const std::vector<std::string>& cells) const {
    std::string line;
    for (std::size_t i = 0; i < columns_.size(); ++i) {
      const Column& column = columns_[i];
      const std::string& cell = i < cells.size() ? cells[i] : std::string();
      if (i > 0) line += " | ";
      if (column.width == 0) {
        line += cell;
      } else if (column.align_left) {
        line += fmt::format("{:<{}}", cell, column.width);
      } else {
        line += fmt::format("{:>{}}", cell, column.width);
      }
    }
    fmt::print("{}\n", line);
  }

  std::vector<Column> columns_;
  std::vector<std::vector<std::string>> rows_;
};

// "-" for a missing value, else the value with `decimals` digits after the point.
inline std::string format_value(std::optional<double> value, int decimals = 1) {
  return value ? fmt::format("{:.{}f}", *value, decimals) : "-";
}

// numerator / denominator with two decimals, "-" if either is missing.
inline std::string format_ratio(std::optional<double> numerator,
                                std::optional<double> denominator) {
  if (!numerator || !denominator || *denominator == 0) return "-";
  return fmt::format("{:.2f}", *numerator / *denominator);
}

// The median, smallest and largest of a set of figures (one per repetition), and how many.
struct Spread {
  double median = 0;
  double min = 0;
  double max = 0;
  std::size_t count = 0;
};

inline std::optional<Spread> spread_of(std::vector<double> values) {
  if (values.empty()) return std::nullopt;
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  const double median = n % 2 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
  return Spread{median, values.front(), values.back(), n};
}

// numerators[i] / denominators[i] for each repetition both have, as a Spread. Repetition i of
// two rows ran close in time when the rows are interleaved (--benchmark_enable_random_interleaving)
// and otherwise just in the same run of the program.
inline std::optional<Spread> ratio_spread(const std::vector<double>& numerators,
                                          const std::vector<double>& denominators) {
  std::vector<double> ratios;
  for (std::size_t i = 0; i < std::min(numerators.size(), denominators.size()); ++i) {
    if (denominators[i] > 0) ratios.push_back(numerators[i] / denominators[i]);
  }
  return spread_of(std::move(ratios));
}

// Runs the benchmarks that `register_benchmarks` registers with a SummaryReporter, then
// `print_summary`. Without --benchmark_min_time (or BENCHMARK_MIN_TIME in the environment)
// every row runs for at least `default_min_time` seconds, and without --benchmark_repetitions
// (or BENCHMARK_REPETITIONS) `default_repetitions` times. Returns the exit status: 1 if a
// benchmark failed one of its checks (or an argument was not understood), else 0.
inline int run_benchmarks(int argc, char** argv, const char* default_min_time,
                          const std::function<void()>& register_benchmarks,
                          const std::function<void(const SummaryReporter&)>& print_summary,
                          int default_repetitions = 1) {
  std::vector<char*> arguments(argv, argv + argc);
  std::string min_time_argument = std::string("--benchmark_min_time=") + default_min_time;
  std::string repetitions_argument =
      "--benchmark_repetitions=" + std::to_string(default_repetitions);
  bool min_time_given = std::getenv("BENCHMARK_MIN_TIME") != nullptr;
  bool repetitions_given = std::getenv("BENCHMARK_REPETITIONS") != nullptr;
  for (int i = 1; i < argc; ++i) {
    min_time_given |= std::string_view(argv[i]).starts_with("--benchmark_min_time");
    repetitions_given |= std::string_view(argv[i]).starts_with("--benchmark_repetitions");
  }
  if (!min_time_given) arguments.push_back(min_time_argument.data());
  if (!repetitions_given && default_repetitions > 1) {
    arguments.push_back(repetitions_argument.data());
  }
  int argument_count = static_cast<int>(arguments.size());
  arguments.push_back(nullptr);

  benchmark::Initialize(&argument_count, arguments.data());
  if (benchmark::ReportUnrecognizedArguments(argument_count, arguments.data())) return 1;
  register_benchmarks();

  SummaryReporter reporter(::isatty(STDOUT_FILENO) ? benchmark::ConsoleReporter::OO_Color
                                                   : benchmark::ConsoleReporter::OO_None);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  if (!reporter.empty()) print_summary(reporter);
  benchmark::Shutdown();
  return reporter.failed() ? 1 : 0;
}

}  // namespace spindle::bench
