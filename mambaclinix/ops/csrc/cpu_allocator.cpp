// A caching allocator for PyTorch's CPU tensors (mambaclinix.ops.cpu_allocator).
//
// glibc serves every allocation above 32 MiB with a fresh mmap and returns it to the kernel on free, so
// each large activation of a 3D network costs page faults and the kernel's zeroing of every page, again
// at every training step. This allocator keeps freed blocks of 1 MiB and more (rounded up to 2 MiB) and
// hands out the smallest kept block that holds a request, if it is at most twice the request's size
// (a training step requests the same sizes each time; the slack lets a block serve a few of them, which
// gave a 5-7 % lower peak memory than exact sizes at a 64³ patch, while 4× gave a higher one); smaller
// requests go to c10's own alloc_cpu/free_cpu. Before a new block is allocated, kept blocks are freed
// until the blocks in use, the kept ones and the new one fit within (1 + headroom) times the most bytes
// ever in use at once; a byte limit bounds the kept blocks too.
//
// Built by mambaclinix/ops/cpu_allocator.py with the system C++ compiler against libc10; driven through
// the extern "C" functions at the end (ctypes).

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <limits>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kMinCached = size_t{1} << 20;  // smaller requests bypass the cache
constexpr size_t kGranule = size_t{2} << 20;    // cached sizes are multiples of this
constexpr size_t kSlack = 2;  // a request may take a kept block up to this many times its size

struct State {
  std::mutex mu;
  std::unordered_map<void*, size_t> live;                   // cached-size block -> its size
  std::map<size_t, std::vector<void*>> free_blocks;  // size -> kept blocks (never empty)
  size_t live_bytes = 0;
  size_t cached_bytes = 0;
  size_t peak_live = 0;  // the most bytes ever in use at once
  size_t limit = std::numeric_limits<size_t>::max();
  double headroom = 0.1;  // in use + kept stays within (1 + headroom) x peak_live, if < 0: unbounded
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t evictions = 0;
};

// Never destroyed: tensors freed while the interpreter shuts down still call cached_free.
State& state() {
  static State* s = new State();
  return *s;
}

void cached_free(void* ptr) {
  if (ptr == nullptr) {
    return;
  }
  State& s = state();
  std::unique_lock<std::mutex> lock(s.mu);
  auto it = s.live.find(ptr);
  if (it == s.live.end()) {  // a small block (or one from before a reset): not ours to keep
    lock.unlock();
    c10::free_cpu(ptr);
    return;
  }
  const size_t size = it->second;
  s.live.erase(it);
  s.live_bytes -= size;
  if (s.cached_bytes + size > s.limit) {
    lock.unlock();
    c10::free_cpu(ptr);
    return;
  }
  s.free_blocks[size].push_back(ptr);
  s.cached_bytes += size;
}

size_t release_all() {
  std::vector<void*> blocks;
  size_t released = 0;
  {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    for (auto& entry : s.free_blocks) {
      released += entry.first * entry.second.size();
      blocks.insert(blocks.end(), entry.second.begin(), entry.second.end());
    }
    s.free_blocks.clear();
    s.cached_bytes = 0;
  }
  for (void* p : blocks) {
    c10::free_cpu(p);
  }
  return released;
}

struct CachingCPUAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (nbytes < kMinCached) {
      void* p = c10::alloc_cpu(nbytes);
      return {p, p, &c10::free_cpu, cpu};
    }
    size_t size = (nbytes + kGranule - 1) / kGranule * kGranule;
    State& s = state();
    void* p = nullptr;
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(s.mu);
      // the smallest kept block of at least `size` bytes and at most kSlack times that
      auto it = s.free_blocks.lower_bound(size);
      if (it != s.free_blocks.end() && it->first <= size * kSlack) {
        size = it->first;
        p = it->second.back();
        it->second.pop_back();
        if (it->second.empty()) {
          s.free_blocks.erase(it);
        }
        s.cached_bytes -= size;
        ++s.hits;
      } else {
        ++s.misses;
        // A new block: first give back kept blocks, largest first, until in use + kept + the new block
        // fit within (1 + headroom) x the most ever in use (this block included).
        if (s.headroom >= 0) {
          const double most = static_cast<double>(std::max(s.peak_live, s.live_bytes + size));
          const double bound = (1.0 + s.headroom) * most;
          while (!s.free_blocks.empty() &&
                 static_cast<double>(s.live_bytes + s.cached_bytes + size) > bound) {
            auto largest = std::prev(s.free_blocks.end());
            evicted.push_back(largest->second.back());
            largest->second.pop_back();
            s.cached_bytes -= largest->first;
            ++s.evictions;
            if (largest->second.empty()) {
              s.free_blocks.erase(largest);
            }
          }
        }
      }
    }
    for (void* block : evicted) {
      c10::free_cpu(block);
    }
    if (p == nullptr) {
      try {
        p = c10::alloc_cpu(size);
      } catch (...) {  // out of memory: give the kept blocks back and try once more
        release_all();
        p = c10::alloc_cpu(size);
      }
    }
    {
      std::lock_guard<std::mutex> lock(s.mu);
      s.live.emplace(p, size);
      s.live_bytes += size;
      s.peak_live = std::max(s.peak_live, s.live_bytes);
    }
    return {p, p, &cached_free, cpu};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &cached_free;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// Never destroyed, like the state: c10 keeps a pointer to it until the process ends.
CachingCPUAllocator* const g_allocator = new CachingCPUAllocator();
c10::Allocator* g_previous = nullptr;
bool g_atfork_registered = false;

// A DataLoader forks its workers from the training process: hold the lock across fork() so that a
// child never starts with it taken by a thread that does not exist there.
void before_fork() {
  state().mu.lock();
}
void after_fork() {
  state().mu.unlock();
}

}  // namespace

extern "C" {

// Install as PyTorch's CPU allocator; returns 1 when it is now the one in use.
int mcx_install(int priority) {
  c10::Allocator* current = c10::GetCPUAllocator();
  if (current == g_allocator) {
    return 1;
  }
  if (!g_atfork_registered) {
    pthread_atfork(&before_fork, &after_fork, &after_fork);
    g_atfork_registered = true;
  }
  g_previous = current;
  c10::SetCPUAllocator(g_allocator, static_cast<uint8_t>(priority));
  return c10::GetCPUAllocator() == g_allocator ? 1 : 0;
}

// Give the allocator in use before mcx_install back its place; blocks handed out stay valid.
int mcx_uninstall(int priority) {
  if (c10::GetCPUAllocator() != g_allocator || g_previous == nullptr) {
    return 0;
  }
  c10::SetCPUAllocator(g_previous, static_cast<uint8_t>(priority));
  {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    s.limit = 0;  // blocks still in use are freed when they come back
  }
  release_all();
  return 1;
}

int mcx_active() {
  return c10::GetCPUAllocator() == g_allocator ? 1 : 0;
}

void mcx_set_limit(uint64_t limit, double headroom) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.limit = static_cast<size_t>(limit);
  s.headroom = headroom;
}

// Give every kept block back; the most bytes in use restarts from those in use now.
uint64_t mcx_empty_cache() {
  const size_t released = release_all();
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.peak_live = s.live_bytes;
  return static_cast<uint64_t>(released);
}

// out: bytes in use, kept, most ever in use; hits, misses, evictions; the byte limit.
void mcx_stats(uint64_t* out) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  out[0] = s.live_bytes;
  out[1] = s.cached_bytes;
  out[2] = s.peak_live;
  out[3] = s.hits;
  out[4] = s.misses;
  out[5] = s.evictions;
  out[6] = s.limit;
}

}  // extern "C"
