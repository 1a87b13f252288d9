// C++ CPU kernels of fused_lora::lora_linear_fwd / lora_linear_bwd.
//
//   forward:  S = dropout(x) A^T,  y = x W^T + b + s * S B^T          -> (y, S), S in x's dtype
//   backward: dS = s * dY B,  dB = s * dY^T S,  dX = dY W + dropout'(dS A),  dA = dS^T dropout(x)
//
// Rows are processed in blocks: per block the keep-mask is drawn (philox.h), the dropped x block is
// written to a per-thread buffer, and the block's GEMMs run through at::mm_out / addmm_out on views, so
// the only temporaries are block-sized (plus fp32 copies of W / A / B on the fp32-compute path below).
// Semantics follow fused_lora/ops/torch_backend.py: dropout is x * (keep * 1/(1-p)), so NaN / inf at a
// dropped position give NaN; with scaling == 0 the LoRA term is still added as 0 * (S B^T).
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>

#include <cmath>
#include <memory>
#include <tuple>
#include <vector>

#include "philox.h"

namespace fused_lora_cpu {
namespace {

// Tuning switches, settable from Python (_set_tuning) for the benchmark and the tests; -1 / 0 = auto.
int64_t g_block_rows = 0;    // rows per block; 0: block_rows() below
int g_parallel_mode = -1;    // 1: at::parallel_for over blocks, 0: blocks in turn with BLAS threads
int g_half_mode = -1;        // 1: bf16 / fp16 GEMMs in fp32, 0: in the dtype (oneDNN), -1: by CPU

struct Dropout {
  bool on = false;
  uint32_t key0 = 0, key1 = 0, threshold = 0;
  double scale = 1.0;
};

Dropout make_dropout(double p, const at::Tensor& seed) {
  Dropout d;
  d.on = p > 0.0;
  if (!d.on) return d;
  TORCH_CHECK(seed.numel() == 1, "fused_lora: seed must be a 0-dim int64 tensor");
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  d.key0 = static_cast<uint32_t>(s);
  d.key1 = static_cast<uint32_t>(s >> 32);
  // Python's round() (drop_threshold) rounds half to even, as nearbyint does in the default mode.
  d.threshold = static_cast<uint32_t>(std::nearbyint(p * 16777216.0));
  d.scale = 1.0 / (1.0 - p);
  return d;
}

bool cpu_has(const char* name) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  auto it = caps.find(name);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

// Whether a 16-bit dtype's GEMMs run in fp32 on converted blocks. Measured on an AVX2 machine (AMD EPYC,
// torch 2.13, MKL + oneDNN): torch.mm in bf16 ran at 7.6-8.3 GFLOP/s against 63-74 in fp32 (M = 64..4096,
// K = N = 1024..4096, one thread), fp16 at 22; converting the operands to fp32 costs far less than that
// gap. CPUs with native bf16 / fp16 matrix units keep the dtype's own GEMMs.
bool fp32_compute(at::ScalarType st) {
  if (st != at::kBFloat16 && st != at::kHalf) return false;
  if (g_half_mode >= 0) return g_half_mode == 1;
  if (st == at::kBFloat16) {
    static const bool native = cpu_has("avx512_bf16") || cpu_has("amx_bf16");
    return !native;
  }
  static const bool native = cpu_has("amx_fp16");
  return !native;
}

// Rows per block. Each block's GEMM repacks W inside MKL, so blocks are not small: one thread, K = N =
// 1024, M = 1024..4096, fp32 fwd+bwd took 14-40% longer with 16-64-row blocks than with 256, and 256
// matched one block of all rows. With several threads the blocks are split so each thread gets one:
// 2 threads, M = 64..1024, K = N = 1024, dropout 0.1, blocks of M / 2 in parallel were 5-20% faster
// than one block with MKL's own threads.
// A W beyond the L3 cache (16 MiB here) is re-read from memory for every block: one thread, K = N = 4096
// fp32 (64 MiB), 1024 tokens, dropout 0, fwd+bwd took 1097 ms in 256-row blocks, 1031 ms in 1024-row
// blocks, and the two big GEMMs alone 972 ms (median of 3, another process on the second core).
int64_t block_rows(int64_t M, int64_t weight_bytes) {
  if (g_block_rows > 0) return g_block_rows;
  const int64_t kMaxRows = weight_bytes > (int64_t{8} << 20) ? 1024 : 256, kMinRows = 16;
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t per_thread = (M + threads - 1) / threads;
  return std::max<int64_t>(std::min(kMaxRows, (per_thread + 7) / 8 * 8), std::min(M, kMinRows));
}

bool parallel_blocks(int64_t nblocks) {
  if (g_parallel_mode >= 0) return g_parallel_mode == 1 && nblocks > 1;
  return nblocks > 1 && at::get_num_threads() > 1;
}

// The block bodies call ATen ops on views of inputs that may require grad. Dispatch below autograd in
// every thread: OpenMP workers do not inherit the caller's thread-local grad mode or excluded dispatch
// keys, and an at::mm_out there on a weight with requires_grad raised "functions with out=... arguments
// don't support automatic differentiation".
template <typename F>
void for_blocks(int64_t nblocks, const F& body) {
  auto guarded = [&](int64_t b0, int64_t b1) {
    at::AutoDispatchBelowADInplaceOrView guard;
    body(b0, b1);
  };
  if (parallel_blocks(nblocks)) {
    at::parallel_for(0, nblocks, 1, guarded);
  } else {
    guarded(0, nblocks);
  }
}

void draw_keep(const Dropout& d, int64_t row0, int64_t rows, int64_t cols, uint8_t* keep) {
  for (int64_t i = 0; i < rows; ++i) {
    philox_keep_row(static_cast<uint32_t>(row0 + i), 0, cols, d.key0, d.key1, d.threshold, keep + i * cols);
  }
}

// out (rows x cols, contiguous, out_t) = x * (keep ? scale : 0), x strided, in the op-math type of in_t.
template <typename in_t, typename out_t>
void apply_keep(const at::Tensor& x, const uint8_t* keep, double scale, at::Tensor& out) {
  using op_t = at::opmath_type<in_t>;
  const int64_t rows = x.size(0), cols = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  const in_t* xp = x.data_ptr<in_t>();
  out_t* op = out.data_ptr<out_t>();
  const op_t sc = static_cast<op_t>(scale);
  for (int64_t i = 0; i < rows; ++i) {
    const in_t* xr = xp + i * s0;
    const uint8_t* kr = keep + i * cols;
    out_t* orow = op + i * cols;
    if (s1 == 1) {
      for (int64_t j = 0; j < cols; ++j) {
        orow[j] = static_cast<out_t>(static_cast<op_t>(xr[j]) * (kr[j] ? sc : op_t(0)));
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) {
        orow[j] = static_cast<out_t>(static_cast<op_t>(xr[j * s1]) * (kr[j] ? sc : op_t(0)));
      }
    }
  }
}

// dst += t * (keep ? scale : 0); dst and t contiguous rows x cols of the same dtype.
template <typename t_t>
void add_kept(at::Tensor& dst, const at::Tensor& t, const uint8_t* keep, double scale) {
  using op_t = at::opmath_type<t_t>;
  const int64_t n = dst.numel();
  t_t* dp = dst.data_ptr<t_t>();
  const t_t* tp = t.data_ptr<t_t>();
  const op_t sc = static_cast<op_t>(scale);
  for (int64_t i = 0; i < n; ++i) {
    dp[i] = static_cast<t_t>(static_cast<op_t>(dp[i]) + static_cast<op_t>(tp[i]) * (keep[i] ? sc : op_t(0)));
  }
}

// out = dropout(x block) in ct (x's dtype, or float on the fp32-compute path).
void dropped_block(const at::Tensor& x_blk, const uint8_t* keep, double scale, at::Tensor& out) {
  const auto in = x_blk.scalar_type(), ct = out.scalar_type();
  if (in == ct) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in, "fused_lora_dropout", [&] {
      apply_keep<scalar_t, scalar_t>(x_blk, keep, scale, out);
    });
  } else {
    TORCH_INTERNAL_ASSERT(ct == at::kFloat);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in, "fused_lora_dropout", [&] {
      apply_keep<scalar_t, float>(x_blk, keep, scale, out);
    });
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                  const at::Tensor& lora_B) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && lora_A.dim() == 2 && lora_B.dim() == 2,
              "fused_lora cpp: x, weight, lora_A, lora_B must be 2-D");
  TORCH_CHECK(x.device().is_cpu(), "fused_lora cpp: CPU tensors only");
  TORCH_CHECK(weight.size(1) == x.size(1) && lora_A.size(1) == x.size(1) &&
                  lora_B.size(0) == weight.size(0) && lora_B.size(1) == lora_A.size(0),
              "fused_lora cpp: shapes do not match: x ", x.sizes(), ", weight ", weight.sizes(), ", lora_A ",
              lora_A.sizes(), ", lora_B ", lora_B.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "fused_lora cpp: weight dtype ", weight.scalar_type(),
              " != x dtype ", x.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                           const at::Tensor& lora_B, double scaling, double dropout_p,
                                           const at::Tensor& seed) {
  check_inputs(x, weight, lora_A, lora_B);
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor s = at::empty({M, r}, x.options());
  if (M == 0) return {y, s};
  const bool conv = fp32_compute(x.scalar_type());
  const auto ct = conv ? at::kFloat : x.scalar_type();
  const at::Tensor Wt = weight.to(ct).t(), At = lora_A.to(ct).t(), Bt = lora_B.to(ct).t();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->to(ct) : at::Tensor();
  const Dropout d = make_dropout(dropout_p, seed);
  const int64_t BM = block_rows(M, N * K * static_cast<int64_t>(c10::elementSize(ct))), nblocks = (M + BM - 1) / BM;

  for_blocks(nblocks, [&](int64_t b0, int64_t b1) {
    const auto opts = x.options().dtype(ct);
    const int64_t rows = std::min(BM, M);
    at::Tensor xbuf = conv ? at::empty({rows, K}, opts) : at::Tensor();
    at::Tensor xdbuf = d.on ? at::empty({rows, K}, opts) : at::Tensor();
    at::Tensor sbuf = conv ? at::empty({rows, r}, opts) : at::Tensor();
    at::Tensor ybuf = conv ? at::empty({rows, N}, opts) : at::Tensor();
    std::vector<uint8_t> keep(d.on ? rows * K : 0);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * BM, mb = std::min(BM, M - m0);
      const at::Tensor x_blk = x.narrow(0, m0, mb);
      const at::Tensor xc = conv ? xbuf.narrow(0, 0, mb).copy_(x_blk) : x_blk;
      at::Tensor xd = xc;
      if (d.on) {
        xd = xdbuf.narrow(0, 0, mb);
        draw_keep(d, m0, mb, K, keep.data());
        dropped_block(x_blk, keep.data(), d.scale, xd);
      }
      at::Tensor s_blk = s.narrow(0, m0, mb);
      at::Tensor sc = conv ? sbuf.narrow(0, 0, mb) : s_blk;
      at::mm_out(sc, xd, At);
      at::Tensor y_blk = y.narrow(0, m0, mb);
      at::Tensor yc = conv ? ybuf.narrow(0, 0, mb) : y_blk;
      if (has_bias) {
        at::addmm_out(yc, b, xc, Wt);
      } else {
        at::mm_out(yc, xc, Wt);
      }
      if (scaling == 0.0) {
        // addmm_ with alpha = 0 skips the product in BLAS and would hide NaN / inf of S B^T.
        yc.add_(at::mm(sc, Bt).mul_(0.0));
      } else {
        yc.addmm_(sc, Bt, 1.0, scaling);
      }
      if (conv) {
        s_blk.copy_(sc);
        y_blk.copy_(yc);
      }
    }
  });
  return {y, s};
}

// Grads not needed come back undefined (None in Python); dA / dB in lora_A's / lora_B's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& s, double scaling, double dropout_p, const at::Tensor& seed,
    bool need_dx, bool need_dA, bool need_dB) {
  check_inputs(x, weight, lora_A, lora_B);
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == M && dy.size(1) == N, "fused_lora cpp: dy has shape ", dy.sizes(),
              ", expected ", at::IntArrayRef{M, N});
  TORCH_CHECK(s.dim() == 2 && s.size(0) == M && s.size(1) == r, "fused_lora cpp: s has shape ", s.sizes(),
              ", expected ", at::IntArrayRef{M, r});
  at::Tensor dx = need_dx ? at::empty({M, K}, x.options()) : at::Tensor();
  const bool conv = fp32_compute(x.scalar_type());
  const auto ct = conv ? at::kFloat : x.scalar_type();
  // Partial dA / dB per thread in fp32 at least (16-bit partials would round once per block).
  const auto acc_t = (ct == at::kDouble) ? at::kDouble : at::kFloat;
  const auto opts = x.options().dtype(ct);
  const int nthreads = at::get_num_threads();
  std::vector<at::Tensor> dA_parts, dB_parts;
  for (int t = 0; t < nthreads; ++t) {
    if (need_dA) dA_parts.push_back(at::zeros({r, K}, opts.dtype(acc_t)));
    if (need_dB) dB_parts.push_back(at::zeros({N, r}, opts.dtype(acc_t)));
  }
  if (M > 0 && (need_dx || need_dA || need_dB)) {
    const at::Tensor Bc = lora_B.to(ct), Ac = lora_A.to(ct);
    const at::Tensor Wc = need_dx ? weight.to(ct) : at::Tensor();
    const Dropout d = make_dropout(dropout_p, seed);
    const bool need_keep = d.on && (need_dx || need_dA);
    const int64_t BM = block_rows(M, N * K * static_cast<int64_t>(c10::elementSize(ct))), nblocks = (M + BM - 1) / BM;

    for_blocks(nblocks, [&](int64_t b0, int64_t b1) {
      const int tid = at::get_thread_num();
      const int64_t rows = std::min(BM, M);
      at::Tensor dybuf = conv ? at::empty({rows, N}, opts) : at::Tensor();
      at::Tensor dsbuf = at::empty({rows, r}, opts);
      at::Tensor sbuf = conv && need_dB ? at::empty({rows, r}, opts) : at::Tensor();
      at::Tensor dxbuf = conv && need_dx ? at::empty({rows, K}, opts) : at::Tensor();
      at::Tensor tbuf = d.on && need_dx ? at::empty({rows, K}, opts) : at::Tensor();
      at::Tensor xbuf = need_dA && (d.on || conv) ? at::empty({rows, K}, opts) : at::Tensor();
      std::vector<uint8_t> keep(need_keep ? rows * K : 0);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t m0 = blk * BM, mb = std::min(BM, M - m0);
        const at::Tensor dy_blk = dy.narrow(0, m0, mb);
        const at::Tensor dyc = conv ? dybuf.narrow(0, 0, mb).copy_(dy_blk) : dy_blk;
        at::Tensor dsc = dsbuf.narrow(0, 0, mb);
        at::mm_out(dsc, dyc, Bc);
        dsc.mul_(scaling);
        if (need_dB) {
          const at::Tensor s_blk = s.narrow(0, m0, mb);
          const at::Tensor sc = conv ? sbuf.narrow(0, 0, mb).copy_(s_blk) : s_blk;
          at::Tensor& part = dB_parts.at(tid);
          if (ct == acc_t) {
            part.addmm_(dyc.t(), sc);
          } else {
            part.add_(at::mm(dyc.t(), sc));
          }
        }
        if (need_keep) draw_keep(d, m0, mb, K, keep.data());
        if (need_dx) {
          at::Tensor dx_blk = dx.narrow(0, m0, mb);
          at::Tensor dxc = conv ? dxbuf.narrow(0, 0, mb) : dx_blk;
          at::mm_out(dxc, dyc, Wc);
          if (d.on) {
            at::Tensor t = tbuf.narrow(0, 0, mb);
            at::mm_out(t, dsc, Ac);
            AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ct, "fused_lora_dx", [&] {
              add_kept<scalar_t>(dxc, t, keep.data(), d.scale);
            });
          } else {
            dxc.addmm_(dsc, Ac);
          }
          if (conv) dx_blk.copy_(dxc);
        }
        if (need_dA) {
          const at::Tensor x_blk = x.narrow(0, m0, mb);
          at::Tensor xd = x_blk;
          if (d.on) {
            xd = xbuf.narrow(0, 0, mb);
            dropped_block(x_blk, keep.data(), d.scale, xd);
          } else if (conv) {
            xd = xbuf.narrow(0, 0, mb).copy_(x_blk);
          }
          at::Tensor& part = dA_parts.at(tid);
          if (ct == acc_t) {
            part.addmm_(dsc.t(), xd);
          } else {
            part.add_(at::mm(dsc.t(), xd));
          }
        }
      }
    });
  }
  // Partials summed in thread order: the result depends only on the thread count, not on timing.
  at::Tensor dA, dB;
  if (need_dA) {
    dA = dA_parts[0];
    for (int t = 1; t < nthreads; ++t) dA.add_(dA_parts[t]);
    dA = dA.to(lora_A.scalar_type());
  }
  if (need_dB) {
    dB = dB_parts[0];
    for (int t = 1; t < nthreads; ++t) dB.add_(dB_parts[t]);
    dB = dB.mul_(scaling).to(lora_B.scalar_type());
  }
  return {dx, dA, dB};
}

at::Tensor keep_mask(uint64_t seed, int64_t rows, int64_t cols, double p, bool portable) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "keep_mask: rows and cols must be >= 0");
  at::Tensor mask = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool));
  if (rows == 0 || cols == 0) return mask;
  Dropout d;
  d.key0 = static_cast<uint32_t>(seed);
  d.key1 = static_cast<uint32_t>(seed >> 32);
  d.threshold = static_cast<uint32_t>(std::nearbyint(p * 16777216.0));
  auto* out = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    if (!portable) {
      draw_keep(d, r0, r1 - r0, cols, out + r0 * cols);
      return;
    }
    for (int64_t i = r0; i < r1; ++i) {
      philox_keep_row_generic(static_cast<uint32_t>(i), 0, cols, d.key0, d.key1, d.threshold, out + i * cols);
    }
  });
  return mask;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& s, double scaling, double dropout_p, const at::Tensor& seed,
    bool need_dx, bool need_dA, bool need_dB) {
  auto [dx, dA, dB] = backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, need_dx, need_dA, need_dB);
  // Custom ops cannot return None: a grad not needed is an empty (0,) tensor of x's dtype.
  auto empty = [&] { return at::empty({0}, x.options()); };
  return {dx.defined() ? dx : empty(), dA.defined() ? dA : empty(), dB.defined() ? dB : empty()};
}

}  // namespace
}  // namespace fused_lora_cpu

// The CPU kernels of the fused_lora ops. What TORCH_LIBRARY_IMPL(fused_lora, CPU, m) does at load, but
// held in a torch::Library this module owns, so that the CPU slot can also be handed back: loading the
// extension inside a test session would otherwise route every later CPU call of the ops in that process
// (TRITON_INTERPRET=1 runs, FUSED_LORA_BACKEND=torch) to these kernels. fused_lora.ops.cpp_backend.load()
// registers them (except under TRITON_INTERPRET=1).
namespace fused_lora_cpu {
namespace {
std::unique_ptr<torch::Library> g_cpu_library;
}  // namespace

bool register_cpu_kernels() {
  if (g_cpu_library) return false;
  g_cpu_library = std::make_unique<torch::Library>(torch::Library::IMPL, "fused_lora", c10::DispatchKey::CPU,
                                                   __FILE__, __LINE__);
  g_cpu_library->impl("lora_linear_fwd", &forward);
  g_cpu_library->impl("lora_linear_bwd", &backward_op);
  return true;
}

bool deregister_cpu_kernels() {
  const bool had = static_cast<bool>(g_cpu_library);
  g_cpu_library.reset();
  return had;
}
}  // namespace fused_lora_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &fused_lora_cpu::forward, "(y, S) of the LoRA linear", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"), py::arg("dropout_p"),
        py::arg("seed"));
  m.def("backward", &fused_lora_cpu::backward, "(dx, dA, dB), None where not needed", py::arg("dy"), py::arg("x"),
        py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("s"), py::arg("scaling"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("need_dx"), py::arg("need_dA"), py::arg("need_dB"));
  m.def(
      "keep_mask",
      [](py::int_ seed, int64_t rows, int64_t cols, double p, bool portable) {
        // The low 64 bits of any Python int: negative int64 seeds and seeds >= 2**63 as the kernels read them.
        const uint64_t s = PyLong_AsUnsignedLongLongMask(seed.ptr());
        if (PyErr_Occurred()) throw py::error_already_set();
        return fused_lora_cpu::keep_mask(s, rows, cols, p, portable);
      },
      "bool (rows, cols) keep-mask for this seed and p; portable: the version without AVX2 intrinsics",
      py::arg("seed"), py::arg("rows"), py::arg("cols"), py::arg("p"), py::arg("portable") = false);
  m.def("register_cpu_kernels", &fused_lora_cpu::register_cpu_kernels,
        "put these kernels in the CPU slot of fused_lora::lora_linear_fwd / _bwd (False if already there)");
  m.def("deregister_cpu_kernels", &fused_lora_cpu::deregister_cpu_kernels,
        "hand the CPU slot back (False if these kernels were not registered)");
  m.def(
      "_set_tuning",
      [](int64_t block_rows, int parallel_mode, int half_mode) {
        fused_lora_cpu::g_block_rows = block_rows;
        fused_lora_cpu::g_parallel_mode = parallel_mode;
        fused_lora_cpu::g_half_mode = half_mode;
      },
      "block rows (0 auto), parallel over blocks (1) or BLAS threads (0) or auto (-1), 16-bit GEMMs in fp32 (1), "
      "in the dtype (0) or by CPU (-1)",
      py::arg("block_rows") = 0, py::arg("parallel_mode") = -1, py::arg("half_mode") = -1);
}
