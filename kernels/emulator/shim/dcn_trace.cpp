// The traced runtime's analyses: the `counters` and `racecheck` modes.
//
// Compiled into the traced runtime only (after dcn_runtime.cpp, with
// DCN_TRACED). Modules of the traced build are compiled by clang with
// -fsanitize-coverage=inline-8bit-counters,trace-loads,trace-stores, which
// calls __sanitizer_cov_load<N>(address) / __sanitizer_cov_store<N>(address)
// before every load and store; the shim's atomics call trace_atomic. Each
// access that falls inside one of the launch's argument buffers (or, for the
// racecheck, the block's shared memory) is attributed to the CUDA thread
// running it (dcn_current).
//
// counters: a block's accesses are recorded, then grouped into warp-level
// requests by (warp, kind, static call site, how many times this thread has
// executed that site); a request touches the distinct 32-byte sectors its
// lanes' bytes fall in. Distinct sectors over the whole launch are kept per
// buffer in bitmaps (what a perfect cache would fetch from DRAM). Shared-memory
// requests are grouped alike and count their wavefronts: the most distinct
// 4-byte words any of the 32 banks must deliver (1 when conflict-free).
//
// racecheck: a shadow entry per element of each buffer (per 2 bytes of shared
// memory) remembers the last writer and a reader, with the block, the thread,
// the barrier epoch of the block, the warp's epoch and whether the write was
// atomic. Two accesses of different threads to one element, at least one a
// plain write (or a plain access against an atomic write), race unless both
// are in the same block with a __syncthreads() between them, or in the same
// warp with a synchronisation of the whole warp between them (__syncwarp() of
// all its lanes, or a wmma operation, which waits for all 32).

#include <algorithm>
#include <unordered_map>

namespace dcn {

enum AccessKind : unsigned char { kLoad = 0, kStore = 1, kAtomic = 2 };
constexpr int kKinds = 3;
constexpr int kCountersAnalysis = 1, kRacecheckAnalysis = 2;
constexpr unsigned kSectorBytes = 32;
constexpr unsigned kSharedGranule = 2;  // bytes per shared-memory shadow entry (half, bf16)

// Mirrors of kernels/emulator/traced.py's ctypes structures.
struct TraceRegion {
  unsigned long long address;
  unsigned long long bytes;
  unsigned long long element_bytes;  // of one lane for vector types
  unsigned long long vector_bytes;   // of the whole vector for vector types (float4*: 16), else 0
};

struct RegionCounts {
  unsigned long long requests[kKinds];
  unsigned long long sectors[kKinds];
  unsigned long long bytes_requested[kKinds];
  unsigned long long bytes_useful[kKinds];
  unsigned long long distinct_read_sectors;
  unsigned long long distinct_written_sectors;
};

struct SharedCounts {
  unsigned long long requests[kKinds];
  unsigned long long wavefronts[kKinds];
};

struct RaceReport {
  unsigned long long races;     // conflicting access pairs found (the first is described)
  int region;                   // argument buffer index, -1 for shared memory
  unsigned long long element;   // element offset in the buffer (byte offset in shared memory)
  unsigned first_block, first_thread, second_block, second_thread;  // linear indices
  int first_kind, second_kind;  // AccessKind
};

namespace {

struct Region {
  TraceRegion where;
  std::vector<std::atomic<unsigned long long>> read_sectors, written_sectors;  // bitmaps
};

// ----------------------------------------------------------- racecheck shadow --
struct Access {
  unsigned block = 0, thread = 0, epoch = 0;
  unsigned char kind = 0;  // 0: none, else AccessKind + 1
  unsigned warp_epoch = 0;  // whole-warp synchronisations of the thread's warp before it
};
struct Shadow {
  Access writer, reader;
  bool many_readers = false;
};

struct Trace {
  int analysis = 0;
  dim3 grid, block;
  unsigned long long low = ~0ull, high = 0;  // span of all regions, for a quick reject
  std::vector<Region> regions;
  std::mutex merge_mutex;
  std::vector<RegionCounts> counts;
  SharedCounts shared{};
  // racecheck
  std::vector<std::vector<Shadow>> shadows;  // per region, per element
  std::unique_ptr<std::atomic_flag[]> stripes;
  std::mutex report_mutex;
  RaceReport report{};
};
constexpr std::size_t kStripes = 4096;

Trace* active_trace = nullptr;  // set around one launch; Python runs traced launches one at a time

struct Record {
  unsigned long long site;
  unsigned thread;
  unsigned warp;
  unsigned visit;  // how many times this thread executed the site before
  unsigned long long address;
  unsigned size;
  unsigned char kind;
  unsigned char region;
};

// Per OS thread: what the block it runs has done so far.
struct BlockState {
  std::vector<Record> records;
  std::vector<Record> shared_records;  // address: shared array index << 40 | byte offset
  std::unordered_map<unsigned long long, unsigned> visits;  // (thread, site) -> times executed
  unsigned epoch = 0;                                      // barriers the block has passed
  std::vector<unsigned> warp_epochs;                       // per warp: its whole-warp syncs
  std::vector<std::pair<unsigned long long, unsigned long long>> shared;  // [start, end)
  std::unordered_map<unsigned long long, Shadow> shared_shadow;            // by granule
};
thread_local BlockState block_state;

unsigned linear_block(const ThreadContext& c) {
  return c.block_idx.x + c.grid_dim.x * (c.block_idx.y + c.grid_dim.y * c.block_idx.z);
}

int find_region(const Trace& t, unsigned long long address) {
  if (address < t.low || address >= t.high) return -1;
  for (std::size_t r = 0; r < t.regions.size(); ++r) {
    const TraceRegion& w = t.regions[r].where;
    if (address >= w.address && address < w.address + w.bytes) return int(r);
  }
  return -1;
}

// ------------------------------------------------------------------ counters --
constexpr unsigned kWidestAccess = 16;  // LDG.128 / STG.128

// clang splits a 16-byte vector access (a uint4 or float4 load) into 8-, 4- or
// 2-byte pieces at distinct call sites, consecutive in the thread's accesses.
// Pieces of one size from distinct sites that start at an aligned 16 bytes (a
// vector parameter's own size) and fill them exactly are joined back into the
// one access the GPU issues. An approximation: distinct contiguous scalar loads
// that happen to fill an aligned 16 bytes are joined too (docs/counters.md); a
// loop's repeated loads (the same sites again) are not.
void join_vector_pieces(const Trace& t, std::vector<Record>& records) {
  std::size_t kept = 0;
  for (std::size_t i = 0; i < records.size();) {
    const Record& head = records[i];
    const TraceRegion& w = t.regions[head.region].where;
    const unsigned long long chunk = w.vector_bytes ? w.vector_bytes : kWidestAccess;
    std::size_t next = i + 1;
    unsigned long long size = head.size;
    if (head.kind != kAtomic && size < chunk && (head.address - w.address) % chunk == 0) {
      while (next < records.size() && size < chunk) {
        const Record& r = records[next];
        if (r.thread != head.thread || r.kind != head.kind || r.region != head.region ||
            r.size != head.size || r.address != head.address + size)
          break;
        bool repeated = false;
        for (std::size_t k = i; k < next; ++k) repeated |= records[k].site == r.site;
        if (repeated) break;
        size += r.size;
        ++next;
      }
    }
    records[kept] = head;
    if (size == chunk && next > i + 1) {
      records[kept].size = unsigned(chunk);
      i = next;
    } else {
      ++i;
    }
    ++kept;
  }
  records.resize(kept);
}

void record(std::vector<Record>& into, int region, unsigned long long address, unsigned size,
            AccessKind kind, const void* site) {
  const ThreadContext& c = *dcn_current;
  BlockState& b = block_state;
  const auto key = reinterpret_cast<unsigned long long>(site) |
                   (static_cast<unsigned long long>(c.linear_tid) << 52);
  const unsigned visit = b.visits[key]++;
  into.push_back({reinterpret_cast<unsigned long long>(site), c.linear_tid, c.linear_tid / 32,
                  visit, address, size, static_cast<unsigned char>(kind),
                  static_cast<unsigned char>(region)});
}

constexpr unsigned kBanks = 32, kBankBytes = 4;

bool same_request(const Record& a, const Record& b) {
  return a.warp == b.warp && a.kind == b.kind && a.site == b.site && a.visit == b.visit;
}

void sort_into_requests(std::vector<Record>& records) {
  std::sort(records.begin(), records.end(), [](const Record& a, const Record& b) {
    return std::tie(a.warp, a.kind, a.site, a.visit, a.address) <
           std::tie(b.warp, b.kind, b.site, b.visit, b.address);
  });
}

// Wavefronts of the block's shared-memory requests: per request, the most
// distinct 4-byte words that fall into one bank (words of one array, by offset).
void count_shared(Trace& t) {
  std::vector<Record>& records = block_state.shared_records;
  sort_into_requests(records);
  SharedCounts counts{};
  std::vector<unsigned long long> words;
  for (std::size_t i = 0; i < records.size();) {
    const Record& head = records[i];
    words.clear();
    for (; i < records.size() && same_request(records[i], head); ++i)
      for (unsigned long long w = records[i].address / kBankBytes;
           w <= (records[i].address + records[i].size - 1) / kBankBytes; ++w)
        words.push_back(w);
    std::sort(words.begin(), words.end());
    words.erase(std::unique(words.begin(), words.end()), words.end());
    unsigned per_bank[kBanks] = {};
    unsigned most = 0;
    for (unsigned long long w : words) most = std::max(most, ++per_bank[w % kBanks]);
    counts.requests[head.kind] += 1;
    counts.wavefronts[head.kind] += most;
  }
  std::lock_guard<std::mutex> lock(t.merge_mutex);
  for (int k = 0; k < kKinds; ++k) {
    t.shared.requests[k] += counts.requests[k];
    t.shared.wavefronts[k] += counts.wavefronts[k];
  }
}

void mark_sectors(std::vector<std::atomic<unsigned long long>>& bitmap, unsigned long long first,
                  unsigned long long last) {
  for (unsigned long long s = first; s <= last; ++s) {
    auto& word = bitmap[s / 64];
    const unsigned long long bit = 1ull << (s % 64);
    if (!(word.load(std::memory_order_relaxed) & bit)) word.fetch_or(bit, std::memory_order_relaxed);
  }
}

// Groups the block's records into warp-level requests and adds them up.
void count_block(Trace& t) {
  std::vector<Record>& records = block_state.records;
  join_vector_pieces(t, records);  // before sorting: the pieces follow each other
  sort_into_requests(records);
  std::vector<RegionCounts> counts(t.regions.size());
  for (std::size_t i = 0; i < records.size();) {
    const Record& head = records[i];
    RegionCounts& into = counts[head.region];
    into.requests[head.kind] += 1;
    long long last_sector = -1;
    unsigned long long last_address = ~0ull;
    for (; i < records.size() && same_request(records[i], head); ++i) {
      const Record& r = records[i];
      Region& region = t.regions[r.region];
      const unsigned long long offset = r.address - region.where.address;
      const long long first = (long long)(offset / kSectorBytes);
      const long long last = (long long)((offset + r.size - 1) / kSectorBytes);
      // Addresses ascend within a request, and its lanes access the same size.
      into.sectors[r.kind] += std::max(0ll, last - std::max(first, last_sector + 1) + 1);
      last_sector = std::max(last_sector, last);
      into.bytes_requested[r.kind] += r.size;
      if (r.address != last_address) into.bytes_useful[r.kind] += r.size;
      last_address = r.address;
      const unsigned long long sectors = region.read_sectors.size() * 64;
      const unsigned long long end = std::min<unsigned long long>(last, sectors - 1);
      if (r.kind != kStore) mark_sectors(region.read_sectors, first, end);
      if (r.kind != kLoad) mark_sectors(region.written_sectors, first, end);
    }
  }
  std::lock_guard<std::mutex> lock(t.merge_mutex);
  for (std::size_t r = 0; r < counts.size(); ++r) {
    for (int k = 0; k < kKinds; ++k) {
      t.counts[r].requests[k] += counts[r].requests[k];
      t.counts[r].sectors[k] += counts[r].sectors[k];
      t.counts[r].bytes_requested[k] += counts[r].bytes_requested[k];
      t.counts[r].bytes_useful[k] += counts[r].bytes_useful[k];
    }
  }
}

// ----------------------------------------------------------------- racecheck --
bool ordered(const Access& earlier, const Access& now) {
  if (earlier.block != now.block) return false;
  if (earlier.thread == now.thread || earlier.epoch < now.epoch) return true;  // or a barrier
  return earlier.thread / 32 == now.thread / 32 && earlier.warp_epoch < now.warp_epoch;
}

void report_race(Trace& t, int region, unsigned long long element, const Access& first,
                 const Access& second) {
  std::lock_guard<std::mutex> lock(t.report_mutex);
  if (t.report.races++ == 0) {
    t.report.region = region;
    t.report.element = element;
    t.report.first_block = first.block;
    t.report.first_thread = first.thread;
    t.report.second_block = second.block;
    t.report.second_thread = second.thread;
    t.report.first_kind = first.kind - 1;
    t.report.second_kind = second.kind - 1;
  }
}

// Checks one access against the element's shadow and updates it.
void check_element(Trace& t, Shadow& s, int region, unsigned long long element,
                   const Access& now) {
  const AccessKind kind = AccessKind(now.kind - 1);
  const Access& w = s.writer;
  if (w.kind && !ordered(w, now) && !(w.kind - 1 == kAtomic && kind == kAtomic)) {
    report_race(t, region, element, w, now);
  } else if (kind != kLoad && s.reader.kind && (s.many_readers || !ordered(s.reader, now))) {
    if (!(s.many_readers && s.reader.block == now.block && s.reader.epoch < now.epoch))
      report_race(t, region, element, s.reader, now);
  }
  if (kind == kLoad) {
    if (s.reader.kind && !ordered(s.reader, now)) s.many_readers = true;
    else if (s.reader.kind && s.reader.epoch < now.epoch) s.many_readers = false;
    s.reader = now;
  } else {
    s.writer = now;
    if (kind == kStore) {  // a plain write supersedes the reads before it
      s.reader = Access{};
      s.many_readers = false;
    }
  }
}

void racecheck(Trace& t, int region, unsigned long long address, unsigned size, AccessKind kind) {
  const ThreadContext& c = *dcn_current;
  BlockState& b = block_state;
  const Access now{linear_block(c), c.linear_tid, b.epoch, static_cast<unsigned char>(kind + 1),
                   b.warp_epochs[c.linear_tid / 32]};
  if (region >= 0) {
    const TraceRegion& w = t.regions[region].where;
    const unsigned long long first = (address - w.address) / w.element_bytes;
    const unsigned long long last =
        std::min<unsigned long long>((address + size - 1 - w.address) / w.element_bytes,
                 t.shadows[region].size() - 1);
    for (unsigned long long e = first; e <= last; ++e) {
      std::atomic_flag& stripe = t.stripes[(e * 0x9E3779B97F4A7C15ull >> 40) % kStripes];
      while (stripe.test_and_set(std::memory_order_acquire)) {
      }
      check_element(t, t.shadows[region][e], region, e, now);
      stripe.clear(std::memory_order_release);
    }
    return;
  }
  for (const auto& [start, end] : b.shared) {
    if (address < start || address >= end) continue;
    for (unsigned long long g = (address - start) / kSharedGranule;
         g <= (address + size - 1 - start) / kSharedGranule; ++g)
      check_element(t, b.shared_shadow[start + g * kSharedGranule], -1, g * kSharedGranule, now);
    return;
  }
}

void trace_access(const void* pointer, unsigned size, AccessKind kind, const void* site) {
  Trace* t = active_trace;
  if (!t || !dcn_current) return;
  const auto address = reinterpret_cast<unsigned long long>(pointer);
  const int region = find_region(*t, address);
  if (t->analysis == kCountersAnalysis) {
    if (region >= 0) {
      record(block_state.records, region, address, size, kind, site);
      return;
    }
    const auto& shared = block_state.shared;
    for (std::size_t a = 0; a < shared.size(); ++a)
      if (address >= shared[a].first && address < shared[a].second)
        return record(block_state.shared_records, 0,
                      (static_cast<unsigned long long>(a) << 40) | (address - shared[a].first),
                      size, kind, site);
  } else if (region >= 0 || !block_state.shared.empty()) {
    racecheck(*t, region, address, size, kind);
  }
}

}  // namespace

// ------------------------------------------------- called by the runtime --
void trace_block_begin() {
  BlockState& b = block_state;
  b.records.clear();
  b.shared_records.clear();
  b.visits.clear();
  b.epoch = 0;
  const dim3 d = dcn_current->block_dim;
  b.warp_epochs.assign((d.x * d.y * d.z + 31) / 32, 0);
  b.shared.clear();
  b.shared_shadow.clear();
  const ThreadContext& c = *dcn_current;
  if (active_trace && current_launch->shared_mem) {
    const auto start = reinterpret_cast<unsigned long long>(c.dynamic_shared);
    b.shared.push_back({start, start + current_launch->shared_mem});
  }
}

void trace_block_end() {
  if (active_trace && active_trace->analysis == kCountersAnalysis) {
    count_block(*active_trace);
    count_shared(*active_trace);
  }
}

void trace_barrier() { ++block_state.epoch; }

void trace_warp_sync(unsigned warp) { ++block_state.warp_epochs[warp]; }

// ------------------------------------------------- called by kernel modules --
void trace_atomic(void* address, unsigned bytes) {
  trace_access(address, bytes, kAtomic, __builtin_return_address(0));
}

void trace_matrix_access(const void* address, unsigned bytes, bool store, const void* site) {
  trace_access(address, bytes, store ? kStore : kLoad, site);
}

void trace_shared(void* array, std::size_t bytes) {
  if (!active_trace) return;
  const auto start = reinterpret_cast<unsigned long long>(array);
  block_state.shared.push_back({start, start + bytes});
}

}  // namespace dcn

// ---------------------------------------------- entry points for Python --
extern "C" void dcn_trace_begin(int analysis, const dcn::TraceRegion* regions, int num_regions,
                                const unsigned* grid, const unsigned* block) {
  using namespace dcn;
  auto* t = new Trace;
  t->analysis = analysis;
  t->grid = dim3(grid[0], grid[1], grid[2]);
  t->block = dim3(block[0], block[1], block[2]);
  t->regions = std::vector<Region>(num_regions);
  t->counts.assign(num_regions, RegionCounts{});
  for (int r = 0; r < num_regions; ++r) {
    Region& region = t->regions[r];
    region.where = regions[r];
    t->low = std::min(t->low, regions[r].address);
    t->high = std::max(t->high, regions[r].address + regions[r].bytes);
    if (analysis == kCountersAnalysis) {
      // Sectors of the buffer's own offsets: the model assumes 32-byte aligned buffers.
      const std::size_t words = (regions[r].bytes + 64 * kSectorBytes - 1) / (64 * kSectorBytes);
      region.read_sectors = std::vector<std::atomic<unsigned long long>>(words);
      region.written_sectors = std::vector<std::atomic<unsigned long long>>(words);
    }
  }
  if (analysis == kRacecheckAnalysis) {
    t->shadows.resize(num_regions);
    for (int r = 0; r < num_regions; ++r)
      t->shadows[r].resize((regions[r].bytes + regions[r].element_bytes - 1) /
                           regions[r].element_bytes);
    t->stripes.reset(new std::atomic_flag[kStripes]);
    for (std::size_t i = 0; i < kStripes; ++i) t->stripes[i].clear();
  }
  active_trace = t;
}

extern "C" void dcn_trace_end(dcn::RegionCounts* counts, dcn::SharedCounts* shared,
                              dcn::RaceReport* report) {
  using namespace dcn;
  std::unique_ptr<Trace> t(active_trace);
  active_trace = nullptr;
  for (std::size_t r = 0; r < t->regions.size(); ++r) {
    RegionCounts& out = counts[r];
    out = t->counts[r];
    for (const auto& word : t->regions[r].read_sectors)
      out.distinct_read_sectors += __builtin_popcountll(word.load());
    for (const auto& word : t->regions[r].written_sectors)
      out.distinct_written_sectors += __builtin_popcountll(word.load());
  }
  *shared = t->shared;
  *report = t->report;
}

// The coverage hooks clang calls before every load and store of a traced module.
extern "C" {
void __sanitizer_cov_8bit_counters_init(char*, char*) {}
#define DCN_ACCESS_HOOK(N, TYPE)                                                   \
  void __sanitizer_cov_load##N(TYPE* address) {                                    \
    dcn::trace_access(address, N, dcn::kLoad, __builtin_return_address(0));        \
  }                                                                                \
  void __sanitizer_cov_store##N(TYPE* address) {                                   \
    dcn::trace_access(address, N, dcn::kStore, __builtin_return_address(0));       \
  }
DCN_ACCESS_HOOK(1, uint8_t)
DCN_ACCESS_HOOK(2, uint16_t)
DCN_ACCESS_HOOK(4, uint32_t)
DCN_ACCESS_HOOK(8, uint64_t)
DCN_ACCESS_HOOK(16, __int128)
#undef DCN_ACCESS_HOOK
}
