"""Loss-level cost of BA-LoRA's NLG terms: time and extra peak memory, as ratios to the task cross-entropy alone.

    .venv/bin/python benchmarks/bench_losses.py [--reps 5] [--threads 2 1] [--out benchmarks/results]

M = 2048 supervised tokens (one sequence of 2049 positions), V = 49,152 (SmolLM2's vocabulary), float32, forward +
backward w.r.t. the logits. Variants:

* ce: `F.cross_entropy` on the (B·T, V) logits with shifted labels (what Hugging Face's causal-LM loss does);
* naive: ce + `losses.nlg_consistency` + `losses.nlg_diversity` + `losses.nlg_svd` (autograd through torch.svd_lowrank,
  q = k + 5, niter 2), i.e. the paper's code path;
* fast: `fused.nlg_fused_loss` with all four terms (randomized SVD, q = k + 20, niter 2, explicit gradient);
* fast_q15: the same with the paper's sketch size q = k + 5;
* fast_hidden: `nlg_fused_loss` (CE + KL + entropy) + `spectral.hidden_svd_loss` on hidden states (M, 576) with the
  frozen head (49,152, 576) that produced the logits (exact SVD term, gradient into the hidden states).

The logits are Z = H Wᵀ with a realistic decaying spectrum (a dominant shared direction, then a power law); the
teacher's are those of a perturbed H. Time: median over `--reps` rounds, the variants interleaved within each round.
Memory: each variant runs once in a fresh subprocess; after building the inputs and a small warm-up the process resets
its peak RSS (writing 5 to /proc/self/clear_refs), runs forward + backward, and reports VmHWM − VmRSS-at-reset: the
honest extra peak on CPU, counting the gradient w.r.t. the logits (which every variant produces). It is given in units
of one float32 (M, V) tensor. SVD gradient quality: cosine of each method's ∂L_svd/∂Z to the exact one, computed in
float64 from H and W (σ(Z) = σ(H R), R Rᵀ = WᵀW).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from balora.fused import nlg_fused_loss, nlg_svd_loss
from balora.losses import nlg_consistency, nlg_diversity, nlg_svd
from balora.spectral import head_gram_root, hidden_svd_loss

M, V, D = 2048, 49152, 576
WEIGHTS = dict(consistency_weight=0.025, diversity_weight=0.005, svd_weight=0.005)  # the paper's λ1, λ2, λ3
VARIANTS = ["ce", "naive", "fast", "fast_q15", "fast_hidden"]


def make_inputs(seed: int = 0, *, decay: float = 0.7, shared: float = 2.0):
    """hidden (1, M+1, D), head (V, D), logits = hidden @ headᵀ (1, M+1, V), teacher logits, labels (1, M+1).

    The hidden states have a power-law spectrum (exponent −decay) plus a shared direction of weight `shared`: the
    logits then have a dominant σ1 and a decaying tail. decay = shared = 0 gives a flat (Marchenko–Pastur) spectrum.
    """
    g = torch.Generator().manual_seed(seed)
    scales = (1.0 + torch.arange(D, dtype=torch.float32)) ** -decay
    hidden = torch.randn(M + 1, D, generator=g) * scales + shared * torch.randn(D, generator=g) * scales
    head = torch.randn(V, D, generator=g) / D**0.5
    logits = hidden @ head.T
    norm = logits[:-1].std().item() / 3.0  # logits with a standard deviation of about 3, as an LM's
    hidden, logits = hidden / norm, logits / norm
    teacher = (hidden + 0.1 * hidden.std() * torch.randn(M + 1, D, generator=g)) @ head.T
    labels = torch.randint(0, V, (1, M + 1), generator=g)
    return hidden[None], head, logits[None], teacher[None], labels


def run_variant(name: str, hidden, head, logits, teacher, labels) -> None:
    """One forward + backward; gradients land in logits.grad (and hidden.grad)."""
    if name == "ce":
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        F.cross_entropy(logits.view(-1, V), shifted.view(-1), ignore_index=-100).backward()
    elif name == "naive":
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        loss = F.cross_entropy(logits.view(-1, V), shifted.view(-1), ignore_index=-100)
        loss = loss + WEIGHTS["consistency_weight"] * nlg_consistency(logits, teacher, labels)
        loss = loss + WEIGHTS["diversity_weight"] * nlg_diversity(logits, labels)
        (loss + WEIGHTS["svd_weight"] * nlg_svd(logits, labels)).backward()
    elif name in ("fast", "fast_q15"):
        oversample = 20 if name == "fast" else 5
        nlg_fused_loss(logits, labels, teacher, svd_oversample=oversample, **WEIGHTS)[0].backward()
    elif name == "fast_hidden":
        kw = {**WEIGHTS, "svd_weight": 0.0}
        total = nlg_fused_loss(logits, labels, teacher, **kw)[0]
        (total + WEIGHTS["svd_weight"] * hidden_svd_loss(hidden, labels, head)).backward()
    else:
        raise ValueError(name)


def peak_rss_kib() -> tuple[int, int]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmHWM"].split()[0]), int(status["VmRSS"].split()[0])


def memory_child(name: str, threads: int) -> None:
    """Subprocess body: print the extra peak RSS of one forward + backward of `name`, in KiB."""
    torch.set_num_threads(threads)
    hidden, head, logits, teacher, labels = make_inputs()
    # warm-up on a 64-token vocabulary: thread pools, MKL buffers, lazy imports; no large buffer stays resident
    small = logits[..., :64].clone().requires_grad_()
    small_labels = labels.clamp_max(63)
    nlg_fused_loss(small, small_labels, teacher[..., :64].contiguous(), **WEIGHTS)[0].backward()
    nlg_svd(small, small_labels).backward()
    F.cross_entropy(small.view(-1, 64), small_labels.view(-1)).backward()
    hidden_svd_loss(hidden[:, :, :8].clone().requires_grad_(), small_labels, head[:64, :8]).backward()
    del small
    head_gram_root(head)  # cached once per frozen head: not a per-step cost
    logits.requires_grad_()
    hidden.requires_grad_()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that it cannot hide new allocations
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    _, base = peak_rss_kib()
    run_variant(name, hidden, head, logits, teacher, labels)
    peak, _ = peak_rss_kib()
    print(json.dumps({"extra_kib": peak - base}))


def measure_memory(threads: int) -> dict[str, float]:
    unit_kib = M * V * 4 / 1024
    out = {}
    for name in VARIANTS:
        res = subprocess.run(
            [sys.executable, __file__, "--memory-child", name, "--threads", str(threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])["extra_kib"] / unit_kib
        print(f"  memory {name}: {out[name]:.2f} logits-sized tensors", flush=True)
    return out


def measure_time(threads: int, reps: int) -> dict[str, list[float]]:
    torch.set_num_threads(threads)
    hidden, head, logits, teacher, labels = make_inputs()
    logits.requires_grad_()
    hidden.requires_grad_()
    head_gram_root(head)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(reps + 1):  # round 0 is a warm-up
        for name in VARIANTS:
            logits.grad = hidden.grad = None
            start = time.perf_counter()
            run_variant(name, hidden, head, logits, teacher, labels)
            if r > 0:
                times[name].append(time.perf_counter() - start)
        print(f"  round {r}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items() if t and r), flush=True)
    return times


def exact_svd_grad_cosines(seeds: int = 3, **spectrum) -> dict[str, list[float]]:
    """Cosine of ∂L_svd/∂Z of each method to the exact gradient, itself computed in float64 from H and W."""
    hidden, head, logits, _, labels = make_inputs(**spectrum)
    h = hidden[0, :-1].double()  # (M, D) valid rows (every position but the last)
    a = h @ head_gram_root(head)  # σ(A) = σ(Z)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK with 2 threads on a loaded machine: 100x slower
    evals, evecs = torch.linalg.eigh(a.T @ a)
    torch.set_num_threads(threads)
    s, p = evals.flip(0)[:10].sqrt(), evecs.flip(1)[:, :10]
    u = a @ p / s  # (M, k)
    fro = torch.linalg.vector_norm(a)
    vk = head.double() @ (h.T @ u) / s  # V_k = Zᵀ U_k / σ (V, k)
    c = s.sum() / fro**3
    z = logits[0, :-1].double()
    exact = -(u @ vk.T) / fro + c * z  # (M, V) float64
    exact_norm = torch.linalg.vector_norm(exact)

    def cos(grad):
        g = grad[0, :-1].double()
        return (torch.sum(g * exact) / (torch.linalg.vector_norm(g) * exact_norm)).item()

    out: dict[str, list[float]] = {
        "explicit q=k+20": [],
        "explicit q=k+10": [],
        "explicit q=k+5": [],
        "autograd through svd_lowrank (q=k+5)": [],
    }
    for seed in range(seeds):
        for name, oversample in (("explicit q=k+20", 20), ("explicit q=k+10", 10), ("explicit q=k+5", 5)):
            x = logits.clone().requires_grad_()
            nlg_svd_loss(x, labels, oversample=oversample, seed=seed).backward()
            out[name].append(cos(x.grad))
        x = logits.clone().requires_grad_()
        torch.manual_seed(seed)
        nlg_svd(x, labels).backward()
        out["autograd through svd_lowrank (q=k+5)"].append(cos(x.grad))
    hx = hidden.clone().requires_grad_()
    hidden_svd_loss(hx, labels, head).backward()
    exact_h = exact @ head.double()  # ∂L/∂H = ∂L/∂Z · W
    gh = hx.grad[0, :-1].double()
    out["hidden-space exact (grad w.r.t. H)"] = [
        (torch.sum(gh * exact_h) / (torch.linalg.vector_norm(gh) * torch.linalg.vector_norm(exact_h))).item()
    ]
    sv = torch.linalg.svdvals(a)
    out["spectrum"] = [sv[0].item(), sv[9].item(), sv[10].item(), sv[29].item()]
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for threads, res in results["by_threads"].items():
        ratios = [res["time_ratio"][n] for n in VARIANTS]
        axes[0].bar(
            [i + 0.4 * (threads == "1") for i in range(len(VARIANTS))], ratios, width=0.4, label=f"{threads} thread(s)"
        )
    axes[0].axhline(2.0, color="k", ls="--", lw=1, label="target 2.0×")
    axes[0].set_xticks(range(len(VARIANTS)), VARIANTS)
    axes[0].set_ylabel("forward + backward time / CE alone")
    axes[0].legend()
    mem = results["memory_logits_units"]
    axes[1].bar(range(len(VARIANTS)), [mem[n] for n in VARIANTS], color="tab:orange")
    axes[1].axhline(1.5, color="k", ls="--", lw=1, label="target 1.5")
    axes[1].set_xticks(range(len(VARIANTS)), VARIANTS)
    axes[1].set_ylabel("extra peak RSS, float32 (M, V) tensors")
    axes[1].legend()
    fig.suptitle(f"M = {M}, V = {V}, float32, CPU ({platform.processor() or platform.machine()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_markdown(results: dict, path: Path, command: str) -> None:
    lines = [
        "# NLG regularizers at loss level: time and memory vs cross-entropy alone",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {results['machine']}; torch {results['torch']}. Shared with other jobs: times are medians of "
        "interleaved rounds and only their ratios are meaningful.",
        "",
        f"Problem: M = {M} supervised tokens, V = {V}, float32, forward + backward w.r.t. the logits (and the hidden "
        "states for fast_hidden); λ = 0.025 / 0.005 / 0.005, T = 2, K = 20, k = 10.",
        "",
        "Memory: each variant once in a fresh subprocess (first thread count); peak RSS (VmHWM, reset through "
        "/proc/self/clear_refs after a small warm-up and malloc_trim) minus the RSS before the step, in units of one "
        "float32 (M, V) tensor; it includes the gradient w.r.t. the logits that every variant returns.",
        "",
        "| variant | " + " | ".join(f"time / CE ({t} thr.)" for t in results["by_threads"]) + " | extra peak memory "
        "(logits-sized) |",
        "| --- | " + " | ".join("---" for _ in results["by_threads"]) + " | --- |",
    ]
    for name in VARIANTS:
        cells = [
            f"{res['time_ratio'][name]:.2f}× ({res['median_s'][name]:.2f} s)" for res in results["by_threads"].values()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {results['memory_logits_units'][name]:.2f} |")
    lines += ["", "Targets: fast ≤ 2.0× CE time and ≤ 1.5 logits-sized tensors of extra memory.", ""]
    for key, title in (
        ("svd_grad_cosine", "decaying spectrum (the benchmark's logits)"),
        ("svd_grad_cosine_flat", "flat spectrum (Gaussian H and W: no well-defined top-k)"),
    ):
        s = results[key]["spectrum"]
        lines += [
            f"SVD-term gradient, cosine to the exact gradient, {title}; σ1 = {s[0]:.1f}, σ10 = {s[1]:.2f}, "
            f"σ11 = {s[2]:.2f}, σ30 = {s[3]:.2f}; one value per sketch seed:",
            "",
        ]
        lines += [
            f"- {name}: " + ", ".join(f"{v:.4f}" for v in vals)
            for name, vals in results[key].items()
            if name != "spectrum"
        ]
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.threads[0])
        return
    command = "python benchmarks/bench_losses.py " + " ".join(sys.argv[1:])
    results: dict = {
        "command": command.strip(),
        "machine": f"{torch.get_num_threads()}-core CPU ({platform.processor() or platform.machine()}), "
        f"{platform.system()}",
        "torch": torch.__version__,
        "M": M,
        "V": V,
        "d": D,
        "weights": WEIGHTS,
        "by_threads": {},
    }
    for threads in args.threads:
        print(f"timing with {threads} thread(s)", flush=True)
        times = measure_time(threads, args.reps)
        median = {n: statistics.median(t) for n, t in times.items()}
        results["by_threads"][str(threads)] = {
            "times_s": times,
            "median_s": median,
            "time_ratio": {n: median[n] / median["ce"] for n in VARIANTS},
        }
    torch.set_num_threads(args.threads[0])
    print("memory", flush=True)
    results["memory_logits_units"] = measure_memory(args.threads[0])
    print("svd gradient cosines", flush=True)
    results["svd_grad_cosine"] = exact_svd_grad_cosines()
    results["svd_grad_cosine_flat"] = exact_svd_grad_cosines(decay=0.0, shared=0.0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "losses.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, args.out / "losses.md", results["command"])
    plot(results, args.out / "losses.png")
    print((args.out / "losses.md").read_text())


if __name__ == "__main__":
    main()
