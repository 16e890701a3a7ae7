"""AIMET's side of benchmarks/peer_aimet.py, run by AIMET's own Python (``--peer-python``): its documented
mixed-precision flow on the model and images the harness hands over, and its simulator's scores.

    <aimet python> benchmarks/peer/aimet_side.py JOB_DIR

JOB_DIR holds ``job.json`` (model arguments, candidates, budget, AI-QS's answer) and ``data.pt`` (the float
model's state, the uint8 images, labels and the normalization). This script writes ``aimet.json`` there:

* ``search_seconds``: ``choose_mixed_precision`` alone (after ``prepare_model``, ``fold_all_batch_norms``, the
  ``QuantizationSimModel`` and its encodings);
* ``answer``: the widths AIMET chose (read after it set them on the simulation), in AI-QS's groups
  (``{"w": {layer: bits}, "a": {tensor: bits}}``);
* ``scores``: AIMET's own simulator's accuracy of its answer and of AI-QS's on the search and test images.

Same tensors: AI-QS's ``generic`` target fuses the residual add into the convolution before it, so the
quantizer AIMET puts on that convolution's output (the add's first input) is switched off, and the logits
stay float, as AI-QS's do. A tensor is named after the kernel that writes it, as in AI-QS: walking back from
a quantizer through ReLUs, adds (first input) and other parameter-free ops to the first convolution, linear
layer or pooling of the original model.
"""
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from aimet_torch.batch_norm_fold import fold_all_batch_norms  # noqa: E402
from aimet_torch.common.defs import CallbackFunc, QuantizationDataType  # noqa: E402
from aimet_torch.mixed_precision import choose_mixed_precision  # noqa: E402
from aimet_torch.model_preparer import prepare_model  # noqa: E402
from aimet_torch.quantsim import QuantizationSimModel  # noqa: E402

from models import build_model  # noqa: E402

INT = QuantizationDataType.int


def batches(x_u8, scale, shift, batch=500):
    for i in range(0, len(x_u8), batch):
        yield x_u8[i:i + batch].permute(0, 3, 1, 2).float() * scale + shift


@torch.no_grad()
def accuracy(model, x_u8, y, scale, shift) -> float:
    """Top-1 accuracy in percent; a k-way tie for the top counts 1/k when it holds the label, as AI-QS counts."""
    credit = 0.0
    for i, h in enumerate(batches(x_u8, scale, shift)):
        logits = model(h)
        top = logits.max(dim=1, keepdim=True).values
        tied = logits == top
        labels = y[i * 500:(i + 1) * 500]
        credit += float((tied.gather(1, labels[:, None])[:, 0].float() / tied.sum(1).float()).sum())
    return 100.0 * credit / len(y)


def producer(node, kernels: set) -> str | None:
    """The original module (a kernel of AI-QS) that writes the tensor at fx `node`."""
    while node is not None:
        if node.op == "call_module" and node.target in kernels:
            return node.target
        if node.op == "placeholder":
            return "input"
        args = [a for a in node.args if hasattr(a, "op")]
        node = args[0] if args else None
    return None


def _kind(model, node) -> str:
    return type(model.get_submodule(node.target)).__name__.lower() if node.op == "call_module" else str(node.target)


def feeds_add_first(model, node) -> bool:
    """Whether `node`'s output, through pass-through modules (the Identity a folded BN leaves), is only the first
    input of an add: the tensor a generic kernel never writes, as the add is fused into the convolution."""
    while len(node.users) == 1 and _kind(model, next(iter(node.users))) == "identity":
        node = next(iter(node.users))
    users = list(node.users)
    return bool(users) and all("add" in _kind(model, u) and u.args[0] is node for u in users)


def tensor_quantizers(sim, kernels: set) -> tuple[dict, list]:
    """{AI-QS tensor name: (module name, "input" | "output", index)} for every activation quantizer (AIMET 2:
    a quantizer is on where it is not None), switching off those the generic target fuses away (the output of
    a convolution that feeds an add as its first input) and the logits'."""
    nodes = {n.target: n for n in sim.model.graph.nodes if n.op == "call_module"}
    found, off = {}, []
    for name, module in sim.model.named_modules():
        if name not in nodes:
            continue
        node = nodes[name]
        for i, q in enumerate(getattr(module, "input_quantizers", None) or []):
            if q is not None:
                found[producer(node.args[0], kernels) if node.args else "input"] = (name, "input", i)
        for i, q in enumerate(getattr(module, "output_quantizers", None) or []):
            if q is None:
                continue
            tensor = producer(node, kernels)
            fused = feeds_add_first(sim.model, node)
            if fused or tensor == "linear":
                module.output_quantizers[i] = None
                off.append(f"{name}.output[{i}]")
            else:
                found[tensor] = (name, "output", i)
    return found, off


def param_owners(sim, kernels: set) -> dict:
    """{layer: its module in the simulation} for every weight layer whose weight is quantized."""
    return {name: m for name, m in sim.model.named_modules()
            if name in kernels and getattr(m, "param_quantizers", None) and m.param_quantizers["weight"] is not None}


def quantizers_of(module, kind):
    return module.input_quantizers if kind == "input" else module.output_quantizers


def read_answer(sim, tensors: dict, params: dict) -> dict:
    def bits(q):
        return 32 if q is None else int(q.bitwidth)
    return {"w": {n: bits(m.param_quantizers["weight"]) for n, m in params.items()},
            "a": {t: bits(quantizers_of(sim.model.get_submodule(name), kind)[i])
                  for t, (name, kind, i) in tensors.items()}}


def apply_answer(sim, tensors: dict, params: dict, answer: dict, forward):
    """Set AIMET's quantizers to an answer in AI-QS's groups (32: off) and recompute the encodings."""
    for n, m in params.items():
        bits = answer["w"].get(n, 32)
        if bits == 32:
            m.param_quantizers["weight"] = None
        else:
            m.param_quantizers["weight"].bitwidth = bits
    for t, (name, kind, i) in tensors.items():
        qs, bits = quantizers_of(sim.model.get_submodule(name), kind), answer["a"].get(t, 32)
        if bits == 32:
            qs[i] = None
        else:
            qs[i].bitwidth = bits
    sim.compute_encodings(forward, None)


def main(job_dir: Path):
    torch.set_num_threads(1)
    job = json.loads((job_dir / "job.json").read_text())
    data = torch.load(job_dir / "data.pt", weights_only=False)
    scale, shift = data["scale"], data["shift"]
    model = build_model(**job["model_args"]).eval()
    model.load_state_dict(data["state_dict"])
    kernels = set(job["kernels"])
    float_acc = {k: accuracy(model, data[f"{k}_x"], data[f"{k}_y"], scale, shift) for k in ("search", "test")}

    t0 = time.perf_counter()
    prepared = prepare_model(model)
    dummy = torch.zeros(1, 3, *data["calib_x"].shape[1:3])
    fold_all_batch_norms(prepared, tuple(dummy.shape))
    sim = QuantizationSimModel(prepared, dummy_input=dummy, default_param_bw=8, default_output_bw=8)
    tensors, off = tensor_quantizers(sim, kernels)
    params = param_owners(sim, kernels)

    def forward(m, _=None):
        with torch.no_grad():
            for h in batches(data["calib_x"], scale, shift):
                m(h)

    def search_acc(m, _=None):
        return accuracy(m, data["search_x"], data["search_y"], scale, shift)

    sim.compute_encodings(forward, None)
    setup_seconds = time.perf_counter() - t0
    candidates = [((a, INT), (w, INT)) for a, w in job["candidates"]]
    t1 = time.perf_counter()
    choose_mixed_precision(sim, dummy, candidates, CallbackFunc(search_acc), CallbackFunc(search_acc), job["max_drop"],
                           str(job_dir / "amp"), True, CallbackFunc(forward))
    search_seconds = time.perf_counter() - t1
    answer = read_answer(sim, tensors, params)
    scores = {"aimet": {"search_acc": search_acc(sim.model),
                        "test_acc": accuracy(sim.model, data["test_x"], data["test_y"], scale, shift)}}
    if job.get("aiqs_answer"):
        apply_answer(sim, tensors, params, job["aiqs_answer"], forward)
        scores["aiqs"] = {"search_acc": search_acc(sim.model),
                          "test_acc": accuracy(sim.model, data["test_x"], data["test_y"], scale, shift)}
    out = {"search_seconds": search_seconds, "setup_seconds": setup_seconds, "float_acc": float_acc,
           "answer": answer, "scores": scores, "switched_off": off,
           "tensor_quantizers": {t: list(w) for t, w in tensors.items()}, "threads": torch.get_num_threads()}
    (job_dir / "aimet.json").write_text(json.dumps(out, indent=2))
    print(f"AIMET: {search_seconds:.0f} s; its answer {scores['aimet']['test_acc']:.2f}% on test in its simulator")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
