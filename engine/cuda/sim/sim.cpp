// The CUDA emulator's scheduler (docs/cuda_emulator.md). Blocks run one after another. The threads of a block run on
// fibers: a thread runs until it reaches a barrier (__syncthreads, a warp collective) and waits there; when every
// runnable thread has had its turn (a "round"), the barriers whose threads have all arrived release them, and the
// next round begins. A round's turn order is the thread order or a fresh random permutation (the schedule).
//
// The fibers are Boost.Context fibers on pooled stacks ("workers"). A worker starts threads one after another on its
// own stack, with no context switch, until one of them waits at a barrier: that thread keeps the worker's stack, and
// the worker hands the CPU straight to whoever has the next turn (an idle worker for a thread not started yet, or the
// worker of a released thread). So a kernel without barriers costs a function call per thread, and each barrier
// about one context switch per thread. The host (the caller of launch) only starts each block and waits for its end.
#include <fmt/format.h>

#include <algorithm>
#include <boost/context/fiber.hpp>
#include <boost/context/preallocated.hpp>
#include <boost/context/protected_fixedsize_stack.hpp>
#include <cstdlib>
#include <exception>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/cuda/sim/device.h"
#include "engine/cuda/sim/emulator.h"

// AddressSanitizer must be told when the stack changes under it, or it reports the fibers' stacks as overflows.
#if defined(__SANITIZE_ADDRESS__)
#define MOELAB_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MOELAB_ASAN 1
#endif
#endif
#if MOELAB_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

namespace moelab::sim {
namespace {

namespace context = boost::context;

// Kernels keep their locals on these stacks (and ASan's instrumentation grows frames); pages are only touched as used.
constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- the schedule ----------------------------------------------------------------------------------------------------

struct ScheduleSetting {
  Schedule schedule = Schedule::shuffled;
  uint64_t seed = 1;
};

ScheduleSetting setting_from_environment() {
  ScheduleSetting setting;
  if (const char* name = std::getenv("MOELAB_SIM_SCHEDULE")) {
    std::string value = name;
    if (value == "forward") {
      setting.schedule = Schedule::forward;
    } else if (value != "shuffled") {
      throw std::invalid_argument("MOELAB_SIM_SCHEDULE must be 'forward' or 'shuffled', not '" + value + "'");
    }
  }
  if (const char* seed = std::getenv("MOELAB_SIM_SEED")) setting.seed = std::strtoull(seed, nullptr, 10);
  return setting;
}

ScheduleSetting& schedule_setting() {
  static ScheduleSetting setting = setting_from_environment();
  return setting;
}

// SplitMix64: a small, fast generator for the shuffled turns. Each host thread that launches kernels has its own,
// seeded from the setting.
struct ShuffleGenerator {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
};

ShuffleGenerator& shuffle_generator() {
  thread_local ShuffleGenerator generator{schedule_setting().seed};
  return generator;
}

// The round's turn order: thread order, or a Fisher-Yates shuffle of it.
void order_turns(std::vector<unsigned>& turns) {
  if (schedule_setting().schedule == Schedule::forward) return;
  ShuffleGenerator& generator = shuffle_generator();
  for (size_t i = turns.size(); i > 1; --i) {
    size_t j = size_t(((generator.next() >> 32) * i) >> 32);  // uniform in [0, i)
    std::swap(turns[i - 1], turns[j]);
  }
}

// ---- one launch ------------------------------------------------------------------------------------------------------

struct Worker;

// not_started, then (running) -> waiting at a barrier -> runnable when it releases -> (running) ... -> returned.
// Running is "runnable" too: the launch's `running` says which thread it is.
enum class ThreadState : uint8_t { not_started, runnable, waiting, returned };

struct Thread {
  uint3 idx{};
  ThreadState state = ThreadState::not_started;
  Worker* worker = nullptr;  // whose stack holds the thread's frames while it runs or waits
  // The barrier it waits at, and what it brought there.
  Barrier barrier = Barrier::syncthreads;
  unsigned mask = 0;
  uint64_t value = 0;
  unsigned lane_arg = 0;
  int width = 0;
  std::source_location where;
  uint64_t result = 0;
  unsigned shared_arrays_declared = 0;  // SHARED_ARRAYs so far, in this block
};

// Shared memory, allocated at its exact size so that AddressSanitizer sees an access past its end.
struct SharedBytes {
  size_t bytes = 0;
  size_t alignment = 0;
  std::byte* data = nullptr;
  std::source_location declared_at;
  SharedBytes(size_t bytes_, size_t alignment_, std::source_location where)
      : bytes(bytes_), alignment(std::max<size_t>(alignment_, 16)), declared_at(where) {
    data = static_cast<std::byte*>(::operator new(bytes, std::align_val_t(alignment)));
  }
  SharedBytes(const SharedBytes&) = delete;
  SharedBytes& operator=(const SharedBytes&) = delete;
  ~SharedBytes() { ::operator delete(data, std::align_val_t(alignment)); }
  void fill_with_nan() { std::memset(data, 0xFF, bytes); }  // uninitialized shared memory may hold anything
};

struct Launch {
  const char* name = nullptr;
  void (*run)(const void* closure) = nullptr;
  const void* closure = nullptr;
  dim3 grid, block;
  uint3 block_idx{};
  std::vector<Thread> threads;
  std::vector<unsigned> turns;  // this round's turn order (thread numbers), and whose turn it is
  size_t next_turn = 0;
  size_t at_block_barrier = 0;         // threads waiting at a block barrier
  std::vector<unsigned> warp_waiting;  // per warp: the lanes waiting at a warp collective
  Thread* running = nullptr;
  std::vector<std::unique_ptr<SharedBytes>> shared_arrays;  // the SHARED_ARRAYs, in declaration order
  size_t shared_array_bytes = 0;
  std::unique_ptr<SharedBytes> dynamic_shared;
  std::exception_ptr error;  // an exception a thread threw, and which thread
  unsigned error_thread = 0;
  bool aborting = false;  // the block is abandoned: its parked threads are being unwound
};

// Thrown at a thread's barrier to unwind its frames when its block is abandoned (a deadlock or another thread's error).
struct Abort {};

// ---- barriers --------------------------------------------------------------------------------------------------------

const char* barrier_name(Barrier barrier) {
  switch (barrier) {
    case Barrier::syncthreads: return "__syncthreads";
    case Barrier::syncthreads_count: return "__syncthreads_count";
    case Barrier::syncthreads_and: return "__syncthreads_and";
    case Barrier::syncthreads_or: return "__syncthreads_or";
    case Barrier::syncwarp: return "__syncwarp";
    case Barrier::shfl_idx: return "__shfl_sync";
    case Barrier::shfl_up: return "__shfl_up_sync";
    case Barrier::shfl_down: return "__shfl_down_sync";
    case Barrier::shfl_xor: return "__shfl_xor_sync";
    case Barrier::ballot: return "__ballot_sync";
    case Barrier::any: return "__any_sync";
    case Barrier::all: return "__all_sync";
    case Barrier::wmma: return "wmma::*_sync";
  }
  return "?";
}

bool is_block_barrier(Barrier barrier) { return barrier <= Barrier::syncthreads_or; }
bool is_shuffle(Barrier barrier) { return barrier >= Barrier::shfl_idx && barrier <= Barrier::shfl_xor; }

const char* file_name(const std::source_location& where) {
  const char* slash = std::strrchr(where.file_name(), '/');
  return slash ? slash + 1 : where.file_name();
}

bool same_place(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

// The value lane `lane` of a warp reads from a completed shuffle, as PTX's shfl.sync defines it: a source outside the
// lane's segment of `width` lanes gives the lane its own value; a source lane that is not in the mask (or not in the
// block) gives an undefined value, here 0xFF bytes (NaN for floats).
uint64_t shuffled_value(const Thread* warp, unsigned group, unsigned lane) {
  const Thread& thread = warp[lane];
  int b = int(thread.lane_arg & 31);  // PTX reads the low 5 bits of srcLane/delta/laneMask
  int width = thread.width;
  int first = int(lane) & ~(width - 1), last = first + width - 1;  // the lane's segment
  int source = 0;
  bool in_segment = true;
  switch (thread.barrier) {
    case Barrier::shfl_idx: source = first + (b & (width - 1)); break;
    case Barrier::shfl_up: source = int(lane) - b, in_segment = source >= first; break;
    case Barrier::shfl_down: source = int(lane) + b, in_segment = source <= last; break;
    case Barrier::shfl_xor: source = int(lane) ^ b, in_segment = source <= last; break;
    default: break;
  }
  if (!in_segment) return thread.value;
  if (!((group >> source) & 1)) return ~uint64_t(0);
  return warp[source].value;
}

// Every lane of `group` (the mask, less lanes the block does not have) waits at the same collective: compute each
// lane's result and release them.
void complete_collective(Thread* warp, unsigned group) {
  unsigned votes = 0;
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (((group >> lane) & 1) && warp[lane].value) votes |= 1u << lane;
  }
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (!((group >> lane) & 1)) continue;
    Thread& thread = warp[lane];
    switch (thread.barrier) {
      case Barrier::ballot: thread.result = votes; break;
      case Barrier::any: thread.result = votes != 0; break;
      case Barrier::all: thread.result = votes == group; break;
      case Barrier::syncwarp:
      case Barrier::wmma: break;
      default: thread.result = shuffled_value(warp, group, lane); break;
    }
    thread.state = ThreadState::runnable;
  }
}

// The barriers release as their last thread arrives; the released threads run in the next round. A barrier that can
// never release (a thread returned, or waits elsewhere) leaves a round with nothing runnable: a deadlock.

// The block's barrier: every thread of the block at the same one.
void arrive_at_block_barrier(Launch& launch) {
  std::vector<Thread>& threads = launch.threads;
  if (++launch.at_block_barrier < threads.size()) return;
  Barrier barrier = threads[0].barrier;
  if (!std::all_of(threads.begin(), threads.end(), [&](const Thread& t) { return t.barrier == barrier; })) return;
  uint64_t count = 0;
  for (const Thread& thread : threads) count += thread.value;
  uint64_t result = 0;
  switch (barrier) {
    case Barrier::syncthreads_count: result = count; break;
    case Barrier::syncthreads_and: result = count == threads.size(); break;
    case Barrier::syncthreads_or: result = count != 0; break;
    default: break;
  }
  for (Thread& thread : threads) {
    thread.result = result;
    thread.state = ThreadState::runnable;
  }
  launch.at_block_barrier = 0;
}

// A warp collective: every lane of its mask (that the block has) at the same collective with the same mask; for
// wmma's, also at the same call.
void arrive_at_warp_collective(Launch& launch, Thread& thread) {
  size_t index = size_t(&thread - launch.threads.data()), first = index & ~size_t(31);
  unsigned lanes = unsigned(std::min<size_t>(32, launch.threads.size() - first));
  unsigned in_block = lanes == 32 ? kFullMask : (1u << lanes) - 1;
  unsigned& waiting = launch.warp_waiting[index / 32];
  waiting |= 1u << (index % 32);
  unsigned group = thread.mask & in_block;
  if ((waiting & group) != group) return;
  Thread* warp = &launch.threads[first];
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (((group >> lane) & 1) && (warp[lane].barrier != thread.barrier || warp[lane].mask != thread.mask ||
                                  (thread.barrier == Barrier::wmma && !same_place(warp[lane].where, thread.where))))
      return;
  }
  complete_collective(warp, group);
  waiting &= ~group;
}

// After a round: line up the threads the barriers released. False when there are none.
bool start_next_round(Launch& launch) {
  launch.turns.clear();
  launch.next_turn = 0;
  for (unsigned i = 0; i < launch.threads.size(); ++i) {
    if (launch.threads[i].state == ThreadState::runnable) launch.turns.push_back(i);
  }
  order_turns(launch.turns);
  return !launch.turns.empty();
}

// ---- contexts: the host and the workers -------------------------------------------------------------------------------

// A context the CPU can switch to: a worker fiber, or the host.
struct Worker {
  context::fiber fiber;  // where it continues, while it is suspended
  const void* stack_bottom = nullptr;
  size_t stack_size = 0;
  void* asan_fake_stack = nullptr;
};

// The contexts of one host thread, and the launch they run.
struct Fibers {
  std::vector<std::unique_ptr<Worker>> workers;
  std::vector<Worker*> idle;        // workers that hold no thread
  Worker host;                      // the host's context (its stack bounds are learnt from ASan on the first switch)
  Worker* switched_from = nullptr;  // who switched to the context that is starting or resuming
  Launch* launch = nullptr;
  bool quitting = false;
  ~Fibers();
};

thread_local Fibers fibers;

Launch& running_launch(const char* what) {
  Launch* launch = fibers.launch;
  if (!launch || !launch->running) throw std::logic_error(std::string(what) + " called outside a kernel");
  return *launch;
}

void before_switch(void** fake_stack_save, const Worker& to) {
#if MOELAB_ASAN
  __sanitizer_start_switch_fiber(fake_stack_save, to.stack_bottom, to.stack_size);
#endif
}
// On arrival: tell ASan, and keep the continuation of the context we came from (which said who it is).
void arrived(Fibers& f, void* fake_stack, context::fiber&& came_from) {
#if MOELAB_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, &f.switched_from->stack_bottom, &f.switched_from->stack_size);
#endif
  f.switched_from->fiber = std::move(came_from);
}

// Leaves `from` (the context running now) for `to`; returns when some context switches back to `from`.
void switch_context(Fibers& f, Worker& from, Worker& to) {
  f.switched_from = &from;
  before_switch(&from.asan_fake_stack, to);
  context::fiber came_from = std::move(to.fiber).resume();
  arrived(f, from.asan_fake_stack, std::move(came_from));
}

Fibers::~Fibers() {
  quitting = true;
  for (Worker* worker : idle) switch_context(*this, host, *worker);  // its loop returns and its fiber ends
}

// The running thread's coordinates, for the kernel and for the barriers it calls.
void enter(Launch& launch, Thread& thread) {
  launch.running = &thread;
  threadIdx = thread.idx;
}

void run_thread(Launch& launch, Thread& thread, Worker& self) {
  thread.state = ThreadState::runnable;
  thread.worker = &self;
  enter(launch, thread);
  try {
    launch.run(launch.closure);
  } catch (const Abort&) {
  } catch (...) {
    if (!launch.error) {
      launch.error = std::current_exception();
      launch.error_thread = unsigned(&thread - launch.threads.data());
    }
  }
  thread.state = ThreadState::returned;
  thread.worker = nullptr;
  launch.running = nullptr;
}

// Whose turn it is, starting the next round when this one is over; null when the block is over (every thread has
// returned, or a deadlock: nothing can be released), has failed, or is being abandoned. The host then takes over.
Thread* next_turn(Launch& launch) {
  if (launch.error || launch.aborting) return nullptr;
  if (launch.next_turn == launch.turns.size() && !start_next_round(launch)) return nullptr;
  return &launch.threads[launch.turns[launch.next_turn]];
}

Worker& idle_worker(Fibers& f);

// Hands the CPU from `self` to whoever has the next turn: the worker of a released thread, an idle worker for a
// thread not started yet, or the host. Returns when `self` is resumed.
void hand_over(Fibers& f, Launch& launch, Worker& self) {
  Thread* thread = next_turn(launch);
  if (!thread) return switch_context(f, self, f.host);
  if (thread->state == ThreadState::not_started) return switch_context(f, self, idle_worker(f));
  ++launch.next_turn;
  enter(launch, *thread);
  if (thread->worker != &self) switch_context(f, self, *thread->worker);  // else: it is the thread that just waited
}

// A worker's life: start the threads whose turn it is on its own stack, one after another. When the turn is another
// worker's (a released thread's, or the host's), it goes idle and hands over.
void serve(Fibers& f, Worker& self) {
  while (!f.quitting) {
    Launch& launch = *f.launch;
    Thread* thread = next_turn(launch);
    if (thread && thread->state == ThreadState::not_started) {
      ++launch.next_turn;
      run_thread(launch, *thread, self);
    } else {
      f.idle.push_back(&self);
      hand_over(f, launch, self);
    }
  }
}

Worker& idle_worker(Fibers& f) {
  if (!f.idle.empty()) {
    Worker* worker = f.idle.back();
    f.idle.pop_back();
    return *worker;
  }
  // A guard page under each stack: a kernel that overflows its stack faults instead of corrupting another.
  context::protected_fixedsize_stack allocator(kStackBytes);
  context::stack_context stack = allocator.allocate();
  auto worker = std::make_unique<Worker>();
  Worker* self = worker.get();
  self->stack_bottom = static_cast<char*>(stack.sp) - stack.size;
  self->stack_size = stack.size;
  self->fiber = context::fiber(std::allocator_arg, context::preallocated(stack.sp, stack.size, stack), allocator,
                               [self](context::fiber&& came_from) {
                                 Fibers& f = fibers;
                                 arrived(f, nullptr, std::move(came_from));
                                 serve(f, *self);
                                 f.switched_from = self;  // quitting: back to the host for good
                                 before_switch(nullptr, f.host);
                                 return std::move(f.host.fiber);
                               });
  f.workers.push_back(std::move(worker));
  return *self;
}

// ---- reports ---------------------------------------------------------------------------------------------------------

std::string block_name(const Launch& launch) {
  return fmt::format("block ({},{},{})", launch.block_idx.x, launch.block_idx.y, launch.block_idx.z);
}

std::string thread_state(const Thread& thread) {
  if (thread.state != ThreadState::waiting) return "have returned";
  std::string mask = is_block_barrier(thread.barrier) ? "" : fmt::format(" (mask {:#010x})", thread.mask);
  return fmt::format("wait at {}{} at {}:{}", barrier_name(thread.barrier), mask, file_name(thread.where),
                     thread.where.line());
}

std::string deadlock_report(const Launch& launch) {
  const std::vector<Thread>& threads = launch.threads;
  std::string report = fmt::format("kernel '{}' deadlocked in {}: ", launch.name, block_name(launch));
  size_t begin = 0;
  for (size_t end = 1; end <= threads.size(); ++end) {  // runs of consecutive threads in the same state
    std::string state = thread_state(threads[begin]);
    if (end < threads.size() && thread_state(threads[end]) == state) continue;
    if (begin > 0) report += "; ";
    report += end - begin == 1 ? fmt::format("thread {} ", begin) : fmt::format("threads {}-{} ", begin, end - 1);
    report += state;
    begin = end;
  }
  if (launch.block.y * launch.block.z > 1) report += " (thread t is x + blockDim.x * (y + blockDim.y * z))";
  return report + ". Every thread of the block must reach the same __syncthreads, and every lane of a mask the same "
                  "warp collective with that mask.";
}

std::string kernel_error(const Launch& launch) {
  std::string what = "an exception that is not a std::exception";
  try {
    std::rethrow_exception(launch.error);
  } catch (const std::exception& e) {
    what = e.what();
  } catch (...) {
  }
  uint3 idx = launch.threads[launch.error_thread].idx;
  return fmt::format("kernel '{}' failed in {}, thread ({},{},{}): {}", launch.name, block_name(launch), idx.x, idx.y,
                     idx.z, what);
}

// ---- running a block (on the host) ----------------------------------------------------------------------------------

// Unwinds the threads parked at barriers, waiting or released (their barrier throws Abort), so that their workers are
// idle again.
void abandon_block(Fibers& f, Launch& launch) {
  launch.aborting = true;
  for (Thread& thread : launch.threads) {
    if (thread.state != ThreadState::waiting && thread.state != ThreadState::runnable) continue;
    enter(launch, thread);
    switch_context(f, f.host, *thread.worker);
  }
}

void run_block(Fibers& f, Launch& launch) {
  // Between blocks every worker is idle: one that is not would keep a thread's frames forever.
  if (f.idle.size() != f.workers.size()) {
    throw std::logic_error(fmt::format("CUDA emulator bug: before kernel '{}', {} of its {} workers hold a thread",
                                       launch.name, f.workers.size() - f.idle.size(), f.workers.size()));
  }
  for (Thread& thread : launch.threads) {
    thread.state = ThreadState::not_started;
    thread.shared_arrays_declared = 0;
  }
  launch.at_block_barrier = 0;
  launch.warp_waiting.assign((launch.threads.size() + 31) / 32, 0);
  for (auto& array : launch.shared_arrays) array->fill_with_nan();
  launch.dynamic_shared->fill_with_nan();
  blockIdx = launch.block_idx;
  launch.turns.resize(launch.threads.size());
  for (unsigned i = 0; i < launch.turns.size(); ++i) launch.turns[i] = i;
  order_turns(launch.turns);
  launch.next_turn = 0;

  switch_context(f, f.host, idle_worker(f));  // back when the block is over, failed, or deadlocked
  if (launch.error) {
    abandon_block(f, launch);
    throw std::runtime_error(kernel_error(launch));
  }
  bool deadlocked = std::any_of(launch.threads.begin(), launch.threads.end(),
                                [](const Thread& t) { return t.state == ThreadState::waiting; });
  if (deadlocked) {
    std::string report = deadlock_report(launch);
    abandon_block(f, launch);
    throw std::runtime_error(report);
  }
}

void check_launch(const char* name, const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared) {
  auto fail = [&](const std::string& why) { throw std::runtime_error(fmt::format("kernel '{}': {}", name, why)); };
  std::string block_text = fmt::format("block ({},{},{})", block.x, block.y, block.z);
  std::string grid_text = fmt::format("grid ({},{},{})", grid.x, grid.y, grid.z);
  if (block.x == 0 || block.y == 0 || block.z == 0) fail(block_text + " is empty");
  if (block.x > kMaxBlockDim[0] || block.y > kMaxBlockDim[1] || block.z > kMaxBlockDim[2]) {
    fail(block_text + " exceeds the largest block dimensions (1024, 1024, 64)");
  }
  uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads > kMaxThreadsPerBlock) fail(fmt::format("{} has {} threads, more than 1024", block_text, threads));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail(grid_text + " is empty");
  if (grid.x > kMaxGridDim[0] || grid.y > kMaxGridDim[1] || grid.z > kMaxGridDim[2]) {
    fail(grid_text + " exceeds the largest grid dimensions (2^31 - 1, 65535, 65535)");
  }
  size_t allowed = max_dynamic_shared(kernel);
  if (dynamic_shared > allowed) {
    fail(allowed == kSharedPerBlock
             ? fmt::format("{} bytes of dynamic shared memory: more than 48 KB needs cudaFuncSetAttribute(kernel, "
                           "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) first",
                           dynamic_shared)
             : fmt::format("{} bytes of dynamic shared memory, more than the {} its cudaFuncSetAttribute allowed",
                           dynamic_shared, allowed));
  }
}

}  // namespace

// ---- the kernel-facing API (device.h) --------------------------------------------------------------------------------

void run_kernel(const char* name, const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared,
                void (*run)(const void* closure), const void* closure) {
  Fibers& f = fibers;
  if (f.launch) {
    throw std::runtime_error(fmt::format("kernel '{}' launched from inside kernel '{}': the emulator has no dynamic "
                                         "parallelism",
                                         name, f.launch->name));
  }
  check_launch(name, kernel, grid, block, dynamic_shared);

  Launch launch;
  launch.name = name;
  launch.run = run;
  launch.closure = closure;
  launch.grid = grid;
  launch.block = block;
  for (unsigned z = 0; z < block.z; ++z) {
    for (unsigned y = 0; y < block.y; ++y) {
      for (unsigned x = 0; x < block.x; ++x) launch.threads.emplace_back().idx = {x, y, z};
    }
  }
  launch.dynamic_shared = std::make_unique<SharedBytes>(dynamic_shared, 128, std::source_location::current());
  blockDim = block;
  gridDim = grid;

  f.launch = &launch;
  struct Leave {
    Fibers& f;
    ~Leave() { f.launch = nullptr; }
  } leave{f};
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        launch.block_idx = {x, y, z};
        run_block(f, launch);
      }
    }
  }
}

uint64_t wait_at(Barrier barrier, unsigned mask, uint64_t value, unsigned lane_arg, int width,
                 const std::source_location& where) {
  Fibers& f = fibers;
  Launch& launch = running_launch(barrier_name(barrier));
  Thread& thread = *launch.running;
  if (!is_block_barrier(barrier)) {
    unsigned lane = unsigned(&thread - launch.threads.data()) % 32;
    if (!((mask >> lane) & 1)) {
      throw std::invalid_argument(
          fmt::format("{} at {}:{} with mask {:#010x}, which does not include the calling lane {}",
                      barrier_name(barrier), file_name(where), where.line(), mask, lane));
    }
    if (is_shuffle(barrier) && (width < 1 || width > 32 || (width & (width - 1)) != 0)) {
      throw std::invalid_argument(fmt::format("{} at {}:{} with width {}: it must be a power of 2 from 1 to 32",
                                              barrier_name(barrier), file_name(where), where.line(), width));
    }
  }
  thread.barrier = barrier;
  thread.mask = mask;
  thread.value = value;
  thread.lane_arg = lane_arg;
  thread.width = width;
  thread.where = where;
  thread.state = ThreadState::waiting;
  if (is_block_barrier(barrier)) {
    arrive_at_block_barrier(launch);
  } else {
    arrive_at_warp_collective(launch, thread);
  }
  launch.running = nullptr;
  hand_over(f, launch, *thread.worker);  // back when the barrier released this thread (and it was entered again)
  if (launch.aborting) throw Abort{};    // ... or when its block is abandoned
  return thread.result;
}

unsigned active_mask() {
  Launch& launch = running_launch("__activemask");
  size_t linear = size_t(launch.running - launch.threads.data());
  size_t first = linear & ~size_t(31), end = std::min(first + 32, launch.threads.size());
  unsigned mask = 0;
  for (size_t i = first; i < end; ++i) {
    if (launch.threads[i].state != ThreadState::returned) mask |= 1u << (i - first);
  }
  return mask;
}

void* shared_bytes(size_t bytes, size_t alignment, const std::source_location& where) {
  Launch& launch = running_launch("SHARED_ARRAY");
  Thread& thread = *launch.running;
  unsigned k = thread.shared_arrays_declared++;
  auto fail = [&](const std::string& why) {
    throw std::logic_error(fmt::format("SHARED_ARRAY at {}:{}: {}", file_name(where), where.line(), why));
  };
  if (k < launch.shared_arrays.size()) {  // another thread of the block (or an earlier block) declared it
    const SharedBytes& array = *launch.shared_arrays[k];
    if (!same_place(array.declared_at, where) || array.bytes != bytes) {
      fail(fmt::format("this thread's shared array #{} ({} bytes) is the block's #{} declared at {}:{} ({} bytes): "
                       "every thread must declare the same shared arrays, in the same order, once",
                       k, bytes, k, file_name(array.declared_at), array.declared_at.line(), array.bytes));
    }
    return array.data;
  }
  if (k > 0 && same_place(launch.shared_arrays[k - 1]->declared_at, where)) {
    fail("declared twice by one thread (in a loop?): declare shared arrays once, at the top of the kernel");
  }
  size_t total = launch.shared_array_bytes + bytes;
  if (total > kSharedPerBlock) {
    fail(fmt::format("{} bytes of static shared memory in all, more than 48 KB (nvcc refuses it)", total));
  }
  if (total + launch.dynamic_shared->bytes > kSharedPerBlockOptin) {
    fail(fmt::format("{} bytes of static and {} of dynamic shared memory, more than 227 KB", total,
                     launch.dynamic_shared->bytes));
  }
  launch.shared_array_bytes = total;
  launch.shared_arrays.push_back(std::make_unique<SharedBytes>(bytes, alignment, where));
  launch.shared_arrays.back()->fill_with_nan();
  return launch.shared_arrays.back()->data;
}

void* dynamic_shared_bytes() { return running_launch("DYNAMIC_SHARED").dynamic_shared->data; }

void trap(const std::source_location& where) {
  throw std::runtime_error(fmt::format("__trap() at {}:{}", file_name(where), where.line()));
}

void set_schedule(Schedule schedule, uint64_t seed) {
  schedule_setting() = ScheduleSetting{schedule, seed};
  shuffle_generator() = ShuffleGenerator{seed};
}

Schedule schedule() { return schedule_setting().schedule; }
uint64_t schedule_seed() { return schedule_setting().seed; }

}  // namespace moelab::sim
