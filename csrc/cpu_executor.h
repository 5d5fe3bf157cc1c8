// CpuExecutor: runs routed experts for a few tokens on the host, straight from the HostPool, while the
// GPU works on the rest: out[t] = sum over (t, k) with topk_ids[t, k] in `experts` of
// topk_weights[t, k] * down(act(gate(x[t]), up(x[t]))), fp32 accumulation, fp32 output; act is the job's
// expert activation (expert_activation.h), each projection plus its bias when the pool's slots hold biases.
// Work is split over a persistent thread pool in two phases: gate/up rows of every expert, then down
// rows partitioned by output column, so no two threads write the same output element.
// The experts' slots may be in any expert format (the pool's layout says which): the kernels read quantized
// weights packed and dequantize them in registers.
// The job's experts are held in the pool while it reads them. When the pool is a cache holding fewer
// experts than the job has, the job runs in rounds of at most `capacity` experts: the first starts at
// submit(), the others run inside wait(), each round's experts released when it ends.
#pragma once
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "cpu_kernels.h"
#include "expert_activation.h"
#include "host_pool.h"
#include "thread_pool.h"

namespace moerun {

class CpuExecutor {
 public:
  // num_threads: threads that run the experts, the caller's included (it works inside wait());
  // 0 = one per physical core but one.
  explicit CpuExecutor(int num_threads);
  // Waits for a running job: its tasks read the buffers below, which die before the thread pool.
  ~CpuExecutor();

  // Starts the experts of `layer` listed in `experts` for the tokens routed to them and returns at once.
  // x: [T, H] host memory of x_dtype (copied before returning); topk_ids [T, K] int64 and topk_weights
  // [T, K] fp32 (read before returning); out: fp32 [T, H], overwritten (rows with no CPU expert become
  // zero) and valid after wait(). keep_alive is released by wait() (it holds out and the pool).
  // The experts are held in the pool (a cache reads missing ones from disk first) until their round ends.
  void submit(HostPool& pool, int64_t layer, const void* x, DType x_dtype, int64_t T, const int64_t* topk_ids,
              const float* topk_weights, int64_t K, const std::vector<int64_t>& experts, float* out,
              std::shared_ptr<void> keep_alive, const ExpertActivation& activation = {});
  void wait();
  bool busy() const { return pool_.busy(); }
  // Worker time of the last job (its rounds summed), valid after wait(): what the experts cost,
  // whatever the caller did between submit and wait.
  double last_job_us() const { return job_us_; }
  CpuIsa isa() const { return isa_; }
  int num_threads() const { return pool_.num_threads(); }

 private:
  struct Job {
    int64_t expert;
    const void* weights;   // expert slot in the pool, set when its round starts
    int64_t first_row;     // offset of this expert's tokens in xg_/h_
    int64_t num_tokens;
  };
  void start_round();      // acquires the next round's experts and submits its phases
  void release_held();

  CpuIsa isa_;
  ThreadPool pool_;
  std::vector<Job> jobs_;
  size_t next_job_ = 0;           // first job of the next round
  size_t round_size_ = 0;         // experts per round (the pool's capacity)
  double job_us_ = 0.0;           // worker time of the current job's finished rounds
  std::vector<float> xg_;         // [rows, H]  gathered token activations, fp32
  std::vector<float> h_;          // [rows, I]  act(gate, up)
  std::vector<uint16_t> xb_, hb_;  // the same rounded to bf16 (bf16 weights on AVX-512-BF16 / AMX)
  std::vector<uint16_t> xv_, hv_;  // and in VNNI order per token tile (AMX)
  std::vector<float> xn_, hn_;     // 4-bit formats: xg_ and h_ in nibble order (cpu_kernels.h)
  std::vector<std::pair<size_t, int64_t>> tiles_;  // (job, first token) of the running round's token tiles
  std::vector<int64_t> row_token_;  // [rows] token index of each gathered row
  std::vector<float> row_weight_;   // [rows] gate weight of each gathered row
  float* out_ = nullptr;
  std::shared_ptr<void> keep_alive_;
  HostPool* host_ = nullptr;      // pool, its slot layout and the layer of the current job
  SlotLayout layout_;
  ExpertActivation activation_;
  int64_t layer_ = 0;
  std::vector<int64_t> held_;     // experts of the running round held in host_
};

}  // namespace moerun
