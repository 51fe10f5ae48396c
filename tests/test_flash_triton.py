"""The Triton FlashAttention-2 kernel against explicit softmax attention and PyTorch's SDPA.

With no GPU here, the kernels run through Triton's interpreter (TRITON_INTERPRET=1, CPU tensors, numpy
underneath). That switch must be on before Triton compiles anything and would leak into every other test,
so the outer run only starts a child pytest on this same file with it on; the child defines the real tests.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _run_child(marker: str) -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton)")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-m", marker, __file__]
    result = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-8000:]
    if " passed" not in out:
        reasons = [line for line in out.splitlines() if line.startswith("SKIPPED")]
        pytest.skip(reasons[0] if reasons else out[-500:])


if not INTERPRETED:

    def test_kernels_under_interpreter():
        _run_child("not slow")

    @pytest.mark.slow
    def test_kernels_under_interpreter_slow():
        _run_child("slow")

    @pytest.mark.slow
    def test_kernels_compile_for_hopper():
        """The interpreter forgives what the compiler does not (types, tile shapes): compile each kernel for
        sm_90 ahead of time, which needs Triton's bundled ptxas but no GPU."""
        triton = pytest.importorskip("triton")
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from scratchlm.model import flash_triton as ft

        if ft.interpreting():
            pytest.skip("TRITON_INTERPRET is set in this process")
        for kernel in (ft._fwd_kernel, ft._bwd_kv_kernel, ft._bwd_q_kernel):
            consts = dict(HEAD_DIM=64, CAUSAL=True, ALIBI=True, PRECISION="tf32", BLOCK_M=64, BLOCK_N=64)
            signature = {}
            for name in kernel.arg_names:
                if name in consts:
                    signature[name] = "constexpr"
                elif name in ("LSE", "DELTA", "SLOPES"):
                    signature[name] = "*fp32"
                elif name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
                    signature[name] = "*bf16"
                else:
                    signature[name] = "fp32" if name.endswith("scale") else "i32"
            try:
                compiled = triton.compile(ASTSource(kernel, signature, consts), target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": 8, "num_stages": 2})
            except RuntimeError as e:
                if "ptxas" in str(e).lower():
                    pytest.skip(f"no usable ptxas: {e!s:.200}")
                raise
            assert "mma" in compiled.asm["ptx"]  # the products went to the tensor cores

    @pytest.mark.gpu
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    @pytest.mark.parametrize("D", [64, 128])
    @pytest.mark.parametrize("alibi", [False, True])
    def test_gpu_bf16_against_sdpa(D, alibi):
        """On a GPU, autotuned tiles, bf16, ragged length, GQA: our error against a float32 reference is at
        most about that of PyTorch's own bf16 SDPA, for the output and all three gradients."""
        pytest.importorskip("triton")
        import torch.nn.functional as F

        from scratchlm.model.flash_triton import flash_attention
        from scratchlm.model.positions import alibi_bias, alibi_slopes

        B, H, Hk, T = 2, 8, 2, 1031
        g = torch.Generator(device="cuda").manual_seed(0)
        base = [torch.randn(B, h, T, D, device="cuda", generator=g) for h in (H, Hk, Hk)]
        do = torch.randn(B, H, T, D, device="cuda", generator=g)
        slopes = alibi_slopes(H).cuda() if alibi else None
        pos = torch.arange(T, device="cuda")
        mask = torch.zeros(H, T, T, device="cuda") if slopes is None else alibi_bias(slopes, pos, pos)
        mask = mask.masked_fill(pos[None, :] > pos[:, None], float("-inf"))

        def run(fn, dtype):
            q, k, v = (x.to(dtype).requires_grad_() for x in base)
            out = fn(q, k, v)
            return [out.float(), *(t.float() for t in torch.autograd.grad(out, (q, k, v), do.to(dtype)))]

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), enable_gqa=True)

        want = run(sdpa, torch.float32)
        peer = run(sdpa, torch.bfloat16)
        ours = run(lambda q, k, v: flash_attention(q, k, v, alibi_slopes=slopes), torch.bfloat16)
        for name, w, p, o in zip(["out", "dq", "dk", "dv"], want, peer, ours):
            ours_err, peer_err = (o - w).abs().max().item(), (p - w).abs().max().item()
            assert ours_err <= 2 * peer_err + 1e-3, f"{name}: ours {ours_err:.2e}, SDPA bf16 {peer_err:.2e}"

    def test_training_refuses_triton_without_gpu():
        from scratchlm.config import ModelConfig
        from scratchlm.errors import UserError
        from scratchlm.model.flash_triton import require_usable

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
        cfg = ModelConfig(attention="triton")
        cfg.validate()  # the config (and so a run trained on a GPU) stays loadable on this machine
        with pytest.raises(UserError) as err:
            require_usable(cfg, torch.device("cpu"))
        message = str(err.value)
        assert "\n" not in message and ("CUDA" in message or "triton package" in message)

else:
    import torch.nn.functional as F
    import triton
    import triton.language as tl

    from scratchlm.config import ModelConfig
    from scratchlm.errors import UserError
    from scratchlm.model.flash_triton import flash_attention
    from scratchlm.model.positions import alibi_slopes
    from scratchlm.model.transformer import Transformer

    @triton.jit
    def _probe(x, n, BLOCK: tl.constexpr):
        # A loop bound computed from the program id: older interpreters fail on it with numpy 2.4.
        end = (tl.program_id(0) + 1) * n
        for i in range(0, end, BLOCK):
            tl.store(x + i + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32) + 1.0)

    try:
        _probe[(1,)](torch.zeros(16), 16, BLOCK=16)
    except Exception as e:  # noqa: BLE001 - any failure means this Triton cannot interpret our kernels
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run the kernels here: {e!r:.200}",
                    allow_module_level=True)

    def reference(q, k, v, *, causal=True, slopes=None):
        """Softmax attention written out in float64: repeated K/V heads, end-aligned causal mask, ALiBi."""
        q, k, v = q.double(), k.double(), v.double()
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        Tq, Tk = q.shape[2], k.shape[2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        q_pos, k_pos = torch.arange(Tq) + (Tk - Tq), torch.arange(Tk)
        if slopes is not None:
            scores = scores + slopes.double()[:, None, None] * (k_pos[None, :] - q_pos[:, None]).double()
        if causal:
            scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        return scores.softmax(-1) @ v, scores.logsumexp(-1)

    def inputs(B, H, Hk, Tq, Tk, D, seed=0):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(B, H, Tq, D, generator=g).requires_grad_()
        k = torch.randn(B, Hk, Tk, D, generator=g).requires_grad_()
        v = torch.randn(B, Hk, Tk, D, generator=g).requires_grad_()
        return q, k, v, torch.randn(B, H, Tq, D, generator=g)

    CASES = {
        # name: (B, H, H_kv, Tq, Tk, D, causal, alibi, (query rows, keys) per tile)
        "mha-one-tile": (1, 2, 2, 16, 16, 16, True, False, (16, 16)),
        "gqa-alibi-ragged": (2, 4, 2, 37, 37, 16, True, True, (16, 16)),
        "mqa-alibi-tall-tiles": (1, 4, 1, 50, 50, 32, True, True, (32, 16)),
        "mqa-wide-tiles": (1, 2, 1, 45, 45, 16, True, False, (16, 32)),
        "gqa-fewer-queries-than-keys": (1, 4, 2, 20, 45, 16, True, True, (16, 16)),
        "not-causal-alibi": (1, 2, 1, 33, 41, 16, False, True, (16, 32)),
    }

    @pytest.mark.parametrize("name", CASES)
    def test_matches_explicit_attention_with_gradients(name):
        B, H, Hk, Tq, Tk, D, causal, alibi, tiles = CASES[name]
        q, k, v, do = inputs(B, H, Hk, Tq, Tk, D)
        slopes = alibi_slopes(H) if alibi else None
        out, lse = flash_attention(q, k, v, causal=causal, alibi_slopes=slopes, block_sizes=tiles, return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), do)
        ref_out, ref_lse = reference(q, k, v, causal=causal, slopes=slopes)
        ref_grads = torch.autograd.grad(ref_out, (q, k, v), do.double())
        assert out.dtype == torch.float32 and out.shape == q.shape
        torch.testing.assert_close(out, ref_out.float(), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse.float(), atol=2e-6, rtol=1e-5)
        for got, want, what in zip(grads, ref_grads, "qkv"):
            assert got.shape == want.shape, what
            torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5, msg=f"d{what}")

    def test_matches_sdpa_gqa_alibi():
        """PyTorch's own kernel as the second, independent reference: float ALiBi + causal mask, GQA."""
        B, H, Hk, T, D = 1, 4, 2, 33, 32
        q, k, v, do = inputs(B, H, Hk, T, T, D, seed=1)
        slopes = alibi_slopes(H)
        pos = torch.arange(T)
        mask = (slopes[:, None, None] * (pos[None, :] - pos[:, None]).float()).masked_fill(
            pos[None, :] > pos[:, None], float("-inf"))
        out = flash_attention(q, k, v, alibi_slopes=slopes, block_sizes=(16, 16))
        grads = torch.autograd.grad(out, (q, k, v), do)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        want_grads = torch.autograd.grad(want, (q, k, v), do)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        for got, ref in zip(grads, want_grads):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)

    def test_strided_inputs_and_output_layout():
        """The model hands over (B, T, H, D) memory seen as (B, H, T, D); the result must not care."""
        B, H, T, D = 2, 2, 24, 16
        g = torch.Generator().manual_seed(2)
        qkv = torch.randn(B, T, 3, H, D, generator=g)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        out = flash_attention(q, k, v, block_sizes=(16, 16))
        torch.testing.assert_close(out, reference(q, k, v)[0].float(), atol=2e-6, rtol=1e-5)
        # The output's memory is (B, T, H, D), so the model's transpose(1, 2).reshape is free.
        assert out.transpose(1, 2).is_contiguous()

    def test_causal_tiles_above_the_diagonal_are_never_read(monkeypatch):
        """Record which query and key rows each program loads: no program may pair a query tile with a key
        tile lying wholly in its future, forward or backward, and the forward reads exactly the
        lower-triangle of tiles."""
        from triton.runtime import interpreter

        B, H, T, D, tile = 1, 1, 64, 16, 16
        q, k, v, do = inputs(B, H, H, T, T, D, seed=3)
        ranges = {}  # name -> (first byte, end byte, bytes per row), filled once the tensors are final
        programs: list[tuple] = []  # (grid index, tensor name, lowest row, highest row) per load
        real_load = interpreter.InterpreterBuilder.create_masked_load

        def spy(self, ptrs, mask, *args):
            addr = ptrs.data.astype("int64")[mask.data.astype(bool)]
            for name, (start, end, row) in ranges.items():
                inside = addr[(addr >= start) & (addr < end)]
                if inside.size:
                    programs.append((self.grid_idx, name, int(inside.min() - start) // row,
                                     int(inside.max() - start) // row))
            return real_load(self, ptrs, mask, *args)

        def watch(**tensors):
            ranges.clear()
            for name, t in tensors.items():
                ranges[name] = (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), t.stride(2) * t.element_size())

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", spy)
        watch(q=q, k=k)
        out = flash_attention(q, k, v, block_sizes=(tile, tile))
        forward = list(programs)
        programs.clear()
        watch(q=q, k=k)
        torch.autograd.grad(out, (q, k, v), do)
        backward = list(programs)
        monkeypatch.undo()

        def check(loads):
            by_program: dict = {}
            for grid, name, lo, hi in loads:
                by_program.setdefault(grid, {"q": [], "k": []})[name].append((lo, hi))
            assert by_program
            for grid, seen in by_program.items():
                for q_lo, q_hi in seen["q"]:
                    for k_lo, _ in seen["k"]:
                        assert k_lo <= q_hi, f"program {grid} read keys from {k_lo} for queries up to {q_hi}"

        check(forward)
        n = T // tile
        assert sum(name == "k" for _, name, _, _ in forward) == n * (n + 1) // 2  # not n * n
        check(backward)
        torch.testing.assert_close(out, reference(q, k, v)[0].float(), atol=2e-6, rtol=1e-5)

    def tiny_model(position: str, attention: str) -> Transformer:
        cfg = ModelConfig(vocab_size=61, context=40, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          position=position, attention=attention)
        torch.manual_seed(0)
        return Transformer(cfg)

    @pytest.mark.parametrize("position", ["alibi", pytest.param("rope", marks=pytest.mark.slow)])
    def test_model_backend_matches_explicit(position):
        """The whole model with attention = "triton" against the explicit path, same weights (the state dict
        loads strictly, so the parameter names did not change): logits and every parameter's gradient."""
        ids = torch.randint(0, 61, (1, 37), generator=torch.Generator().manual_seed(4))
        explicit, ours = tiny_model(position, "explicit"), tiny_model(position, "triton")
        ours.load_state_dict(explicit.state_dict(), strict=True)
        logits = [m(ids) for m in (explicit, ours)]
        torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
        for m, out in zip((explicit, ours), logits):
            F.cross_entropy(out[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1)).backward()
        for (name, p), (_, p_ours) in zip(explicit.named_parameters(), ours.named_parameters()):
            torch.testing.assert_close(p_ours.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)

    def test_config_checks_under_interpreter():
        ModelConfig(attention="triton", d_model=64, n_heads=4).validate()  # the interpreter stands in for a GPU
        with pytest.raises(UserError, match="dropout"):
            ModelConfig(attention="triton", d_model=64, n_heads=4, dropout=0.1).validate()
        with pytest.raises(UserError, match="head sizes"):
            ModelConfig(attention="triton", d_model=96, n_heads=4, position="alibi").validate()

    @pytest.mark.slow
    @pytest.mark.parametrize("D", [64, 128])
    def test_large_head_dims(D):
        """Head sizes of real models (64 for GPT-2 and qt-1b, 128 for larger ones), GQA, ALiBi, ragged T."""
        q, k, v, do = inputs(1, 4, 2, 40, 40, D, seed=5)
        slopes = alibi_slopes(4)
        out = flash_attention(q, k, v, alibi_slopes=slopes, block_sizes=(16, 16))
        grads = torch.autograd.grad(out, (q, k, v), do)
        ref_out, _ = reference(q, k, v, slopes=slopes)
        ref_grads = torch.autograd.grad(ref_out, (q, k, v), do.double())
        torch.testing.assert_close(out, ref_out.float(), atol=2e-6, rtol=1e-5)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want.float(), atol=2e-5, rtol=1e-5)

    @pytest.mark.slow
    def test_longer_sequence_mixed_tiles():
        """80 positions, three heads (not a power of two, so odd ALiBi slopes), tiles 32 x 16 and 16 x 32."""
        q, k, v, do = inputs(1, 3, 3, 80, 80, 32, seed=6)
        slopes = alibi_slopes(3)
        ref_out, _ = reference(q, k, v, slopes=slopes)
        ref_grads = torch.autograd.grad(ref_out, (q, k, v), do.double())
        for tiles in [(32, 16), (16, 32)]:
            out = flash_attention(q, k, v, alibi_slopes=slopes, block_sizes=tiles)
            grads = torch.autograd.grad(out, (q, k, v), do)
            torch.testing.assert_close(out, ref_out.float(), atol=2e-6, rtol=1e-5)
            for got, want in zip(grads, ref_grads):
                torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
