"""Structure derived from the traced graph: any CNN of the ops below, the registry's included, gets its kernels,
tensors, segments and conv-BN pairs (models/structure.py), with its quantizer Slots inserted by rewriting the graph.
The structures the registry's models once declared by hand are test data (tests/declared.py) these equal.

    from models.graph import trace_model
    model = trace_model(torchvision.models.resnet18(), input_shape=(1, 3, 224, 224))
    model.kernels("generic"), model.tensors("ort-cpu"), model.segments("generic"), model.conv_bn_pairs()

``torch.fx`` traces the model in eval mode (Slots, ``Add`` and modules with a ``read_view`` stay leaves), and a
sample input gives every node its shape. The function calls that read tensors (adds, products, concatenations,
pooling, flatten, slicing, padding) become small modules (``Op``), so the trace's hooks see what they read, as
they see convolutions. Then, under a target's fusion rules:

* **Kernels.** Each convolution, linear layer, pooling, residual add, element-wise product (squeeze-excitation's
  scaling) and concatenation starts a kernel. It takes in, while its output has one user: the BN right after a
  convolution (a conv-BN pair, folded), activations, element-wise ops with constants, flatten / reshape /
  dropout, and Slots. Under ``generic`` (TensorRT's usual fusion) a residual add is fused into the convolution
  that writes one of its inputs, when that output has no other user: the deeper one (more weight layers on its
  longest path from the image; a tie goes to the later one), so a projection shortcut stays its own kernel.
  Under ``ort-cpu`` every add is its own kernel, and so is every slice and pad (ONNX Runtime materializes what
  Slice and Pad write); a slice or pad that does nothing else writes a copy that ``follows`` the tensor it
  reads (no width of its own). Kernels run in dependency order, ties in the order forward writes their tensors.
* **Tensors** are what kernels write, named after the kernel (the image is ``input``). A tensor can be negative
  unless the op that writes it is a ReLU, ReLU6, sigmoid or hard sigmoid, or it is pooled, added, multiplied or
  concatenated from tensors that cannot be.
* **Reads.** A kernel reads the tensors its ops take from outside it, through slicing, padding and reshapes; it
  is charged the elements it uses (``models.structure.conv_read_fraction``: the rows and columns a
  convolution's windows touch at its input's size; the share a slice keeps).
* **Segments** end where exactly one tensor is live (after a block), so running them in order is ``forward``; a
  segment without weight layers joins the next one.

An op the rules do not cover is an error that names the op, the node and the module it sits in; nothing is
priced by guess or left float unseen. A module with parameters or buffers called twice is refused too (its
weights would be charged once and quantized once for two uses).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_aggregate, map_arg
from torch.fx.passes.shape_prop import ShapeProp

from models.structure import (DEFAULT_TARGET, INPUT, TARGETS, Add, Kernel, Read, Segment, Slot, Tensor, check_target,
                              conv_read_fraction)
from models.errors import UserError

UNSIGNED_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)
SIGNED_ACT_MODULES = (nn.Hardswish, nn.SiLU, nn.GELU, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish)
RESHAPE_MODULES = (nn.Flatten, nn.Dropout, nn.Identity)
POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
UNSIGNED_ACT_FNS = {F.relu, torch.relu, torch.relu_, F.relu6, F.hardsigmoid, torch.sigmoid, F.sigmoid}
SIGNED_ACT_FNS = {F.hardswish, F.silu, F.gelu, torch.tanh, F.leaky_relu, F.elu, F.mish}
RESHAPE_FNS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, F.dropout}
POOL_FNS = {F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.adaptive_max_pool2d, torch.mean}
ADD_FNS = {operator.add, operator.iadd, torch.add}
MUL_FNS = {operator.mul, operator.imul, torch.mul}
SCALAR_FNS = {operator.sub, operator.truediv, operator.neg, torch.sub, torch.div, *ADD_FNS, *MUL_FNS}
CAT_FNS = {torch.cat, torch.concat}
UNSIGNED_ACT_METHODS = {"relu", "relu_", "sigmoid"}
SIGNED_ACT_METHODS = {"tanh"}
RESHAPE_METHODS = {"flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze"}
POOL_METHODS = {"mean"}
ADD_METHODS, MUL_METHODS = {"add", "add_"}, {"mul", "mul_"}
SCALAR_METHODS = {"sub", "div", *ADD_METHODS, *MUL_METHODS}
META_METHODS, META_ATTRS = {"size", "dim", "numel"}, {"shape", "dtype", "device", "ndim"}
IDENTITY_FN_NAMES = {"stochastic_depth"}   # torchvision.ops: the identity in eval mode
ANCHORS = ("weight", "pool", "add", "mul", "cat")   # the kinds of node that start a kernel
ABSORBED = ("act+", "act-", "scalar", "reshape", "slot")   # what a kernel takes in after its first op
VIEWS = ("reshape", "strided", "slot")   # what a kernel reads through (a slot there holds no quantizer)
SUPPORTED = ("Conv2d, Linear, BatchNorm2d after a conv, ReLU/ReLU6/sigmoid/hard sigmoid/Hardswish/SiLU/GELU, "
             "residual adds, element-wise products, concatenation, average/max pooling, flatten/reshape/dropout, "
             "slicing and padding")


class Op(nn.Module):
    """A function call of the traced graph as a module, so that forward hooks see what it reads. ``template``
    holds the call's arguments with ``_Arg(i)`` where the i-th tensor goes."""

    def __init__(self, kind: str, target, template: tuple, strided: bool = False):
        super().__init__()
        self.kind, self.target, self.template, self.strided = kind, target, template, strided

    def forward(self, *xs):
        args, kwargs = map_aggregate(self.template, lambda a: xs[a.i] if isinstance(a, _Arg) else a)
        if self.kind == "call_method":
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)

    def read_view(self, x):
        """The elements of `x` a slice uses (a pad reads all of its input)."""
        return self.forward(x) if self.strided and self.target is operator.getitem else x   # no hooks

    def extra_repr(self):
        return getattr(self.target, "__name__", str(self.target))


@dataclass(frozen=True)
class _Arg:
    i: int


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, (Slot, Add)) or hasattr(m, "read_view") or super().is_leaf_module(m, qualname)


@dataclass(frozen=True)
class _Structure:
    kernels: tuple[Kernel, ...]
    tensors: tuple[Tensor, ...]
    segments: tuple[tuple[str, tuple[str, ...], tuple[str, ...], str | None], ...]   # (name, nodes, kernels, result)
    pairs: tuple[tuple[str, str], ...]   # (conv, BN) in kernel order


class TracedModel(fx.GraphModule):
    """A model whose structure was derived from its traced graph (``trace_model``): the registry's interface
    (kernels, tensors, segments, conv_bn_pairs) on the rewritten graph, with the original parameter names."""

    def kernels(self, target: str = DEFAULT_TARGET) -> list[Kernel]:
        return list(self.aiqs_structure[check_target(target)].kernels)

    def tensors(self, target: str = DEFAULT_TARGET) -> list[Tensor]:
        return list(self.aiqs_structure[check_target(target)].tensors)

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return list(self.aiqs_pairs)

    def segments(self, target: str = DEFAULT_TARGET) -> list[Segment]:
        """Each segment a GraphModule over its nodes, sharing this model's modules (their quantizers and
        parametrizations included)."""
        nodes = {n.name: n for n in self.graph.nodes}
        output = next(n for n in self.graph.nodes if n.op == "output")
        out = []
        for name, node_names, kernels, result in self.aiqs_structure[check_target(target)].segments:
            g, env, inside = fx.Graph(), {}, set(node_names)
            for n in (nodes[m] for m in node_names):
                for a in n.all_input_nodes:
                    if a.name not in inside and a not in env:
                        env[a] = g.node_copy(a) if a.op == "get_attr" else g.placeholder(a.name)
                env[n] = g.placeholder(n.name) if n.op == "placeholder" else g.node_copy(n, lambda a: env[a])
            g.output(map_arg(output.args[0], lambda a: env[a]) if result is None else env[nodes[result]])
            out.append(Segment(name, fx.GraphModule(self, g, class_name=f"Segment{len(out)}"), kernels))
        return out

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        res._modules = {k: memo.get(id(m), res._modules.get(k)) for k, m in self._modules.items()}   # the own tree
        type(res).__name__ = type(self).__name__   # GraphModule's init names a copy's class "GraphModule"
        for k in ("aiqs_structure", "aiqs_pairs", "model_args", "input_shape"):
            if k in self.__dict__:
                setattr(res, k, copy.deepcopy(self.__dict__[k], memo))
        return res


def _tensor_valued(n: fx.Node) -> bool:
    return isinstance(n.meta.get("tensor_meta"), torch.fx.passes.shape_prop.TensorMetadata)


def _numel(n: fx.Node) -> int:
    s = n.meta["tensor_meta"].shape
    return int(torch.Size(s).numel())


def _tensor_inputs(n: fx.Node) -> list[fx.Node]:
    out = []
    map_arg((n.args, n.kwargs), lambda a: out.append(a) if _tensor_valued(a) and a not in out else None)
    return out


def _where(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    scope = next(reversed(stack), "") if stack else ""
    return scope.split("@")[0]


def _describe(n: fx.Node, modules: dict) -> str:
    what = (type(modules[n.target]).__name__ if n.op == "call_module" else
            getattr(n.target, "__name__", str(n.target)))
    return f"{what} (node {n.name!r}, in {_where(n) or 'the top-level module'})"


def _kind(n: fx.Node, modules: dict) -> str:
    """What a node is to the fusion rules."""
    if n.op in ("placeholder", "output"):
        return n.op
    if n.op == "get_attr":
        return "const"
    if not _tensor_valued(n):   # a size or a shape is fine; an op returning several tensors (sort, split) is not
        meta = n.op == "call_method" and n.target in META_METHODS or (
            n.target is getattr and len(n.args) > 1 and n.args[1] in META_ATTRS)
        return "const" if meta or not _tensor_inputs(n) else "unsupported"
    t = n.target
    ins = len(_tensor_inputs(n))
    if n.op == "call_module":
        m = modules[t]
        if isinstance(m, Slot):
            return "slot"
        if isinstance(m, Op):
            return _fn_kind(m.kind, m.target, ins, m.strided)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return "weight"
        if isinstance(m, nn.BatchNorm2d):
            return "bn"
        if isinstance(m, UNSIGNED_ACT_MODULES):
            return "act+"
        if isinstance(m, SIGNED_ACT_MODULES):
            return "act-"
        if isinstance(m, RESHAPE_MODULES):
            return "reshape"
        if isinstance(m, POOL_MODULES):
            return "pool"
        if isinstance(m, Add):
            return "add"
        if hasattr(m, "read_view"):
            return "strided"
        return "unsupported"
    return _fn_kind(n.op, t, ins, None)


def _fn_kind(op: str, t, ins: int, strided) -> str:
    if op == "call_method":
        table = ((UNSIGNED_ACT_METHODS, "act+"), (SIGNED_ACT_METHODS, "act-"), (RESHAPE_METHODS, "reshape"),
                 (POOL_METHODS, "pool"))
        for names, kind in table:
            if t in names:
                return kind
        if ins == 2 and t in ADD_METHODS:
            return "add"
        if ins == 2 and t in MUL_METHODS:
            return "mul"
        return "scalar" if ins == 1 and t in SCALAR_METHODS else "unsupported"
    if t in UNSIGNED_ACT_FNS:
        return "act+"
    if t in SIGNED_ACT_FNS:
        return "act-"
    if t in RESHAPE_FNS or getattr(t, "__name__", None) in IDENTITY_FN_NAMES:
        return "reshape"
    if t in POOL_FNS:
        return "pool"
    if t in CAT_FNS:
        return "cat"
    if t is operator.getitem or t is F.pad:
        return "strided"
    if ins == 2 and t in ADD_FNS:
        return "add"
    if ins == 2 and t in MUL_FNS:
        return "mul"
    return "scalar" if ins == 1 and t in SCALAR_FNS else "unsupported"


def _op_name(gm: fx.GraphModule, n: fx.Node) -> str:
    base = getattr(n.target, "__name__", str(n.target)).strip("_").replace(".", "_") or "op"
    scope = _where(n)
    name, i = f"{scope}.{base}" if scope else base, 1
    while _has_path(gm, name):
        name, i = f"{scope}.{base}_{i}" if scope else f"{base}_{i}", i + 1
    return name


def _has_path(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return hasattr(gm, path.split(".")[0]) and "." not in path


def _add_module(gm: nn.Module, path: str, m: nn.Module):
    parent, _, leaf = path.rpartition(".")
    owner = gm
    for item in parent.split(".") if parent else ():
        if not hasattr(owner, item):
            owner.add_module(item, nn.Module())
        owner = getattr(owner, item)
    owner.add_module(leaf, m)


def _modulize(gm: fx.GraphModule):
    """Turn every function call that reads tensors as a kernel or a view does into an ``Op`` module."""
    modules = dict(gm.named_modules())
    for n in list(gm.graph.nodes):
        if n.op not in ("call_function", "call_method"):
            continue
        kind = _kind(n, modules)
        if kind not in ("pool", "add", "mul", "cat", "reshape", "strided"):
            continue
        tensors = _tensor_inputs(n)
        template = map_arg((n.args, n.kwargs), lambda a: _Arg(tensors.index(a)) if a in tensors else a)
        if any(isinstance(a, fx.Node) for a in _flatten(template)):
            continue   # an argument computed in the graph that is not a tensor (a size): leave the call as it is
        path = _op_name(gm, n)
        _add_module(gm, path, Op(n.op, n.target, template, strided=kind == "strided"))
        with gm.graph.inserting_after(n):
            new = gm.graph.call_module(path, tuple(tensors))
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        modules[path] = gm.get_submodule(path)
    gm.recompile()


def _flatten(x):
    out = []
    map_aggregate(x, lambda a: out.append(a))
    return out


class _Analysis:
    """One target's kernels over the current graph, as chains of nodes."""

    def __init__(self, gm: fx.GraphModule, target: str):
        self.gm, self.target = gm, target
        self.modules = dict(gm.named_modules())
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.kind = {n: _kind(n, self.modules) for n in self.nodes}
        bad = [n for n in self.nodes if self.kind[n] == "unsupported"]
        if bad:
            raise UserError(f"AI-QS cannot price {_describe(bad[0], self.modules)}: the traced-graph rules cover "
                            f"{SUPPORTED}. Rewrite that part of the model with these ops.")
        self._check_reuse()
        self.depth = self._depths()
        self.chains = self._chains()
        self.owner = {n: a for a, ch in self.chains.items() for n in ch}
        inp = [n for n in self.nodes if n.op == "placeholder"]
        if len(inp) != 1:
            raise UserError(f"AI-QS traces models of one input (the image); this one takes {len(inp)}.")
        self.input_chain = self._extend([inp[0]], only=("slot",))
        self.tails = {ch[-1]: self._name(a) for a, ch in self.chains.items()}
        self.tails[self.input_chain[-1]] = INPUT

    def _check_reuse(self):
        seen = {}
        for n in self.nodes:
            if n.op == "call_module" and self.kind[n] in ANCHORS + ("bn", "strided"):
                m = self.modules[n.target]
                if n.target in seen and (self.kind[n] in ANCHORS or next(m.parameters(), None) is not None
                                         or next(m.buffers(), None) is not None):
                    raise UserError(f"module {n.target!r} ({type(m).__name__}) is called twice (nodes "
                                    f"{seen[n.target]!r} and {n.name!r}); AI-QS prices and quantizes each "
                                    f"kernel's module once. Give each call its own module.")
                seen[n.target] = n.name

    def _depths(self) -> dict:
        depth = {}
        for n in self.nodes:
            d = max((depth[a] for a in n.all_input_nodes), default=0)
            depth[n] = d + (self.kind[n] == "weight")
        return depth

    def _is_conv(self, n):
        return n.op == "call_module" and isinstance(self.modules[n.target], nn.Conv2d)

    def _extend(self, chain: list, only=ABSORBED) -> list:
        while len(chain[-1].users) == 1:
            u = next(iter(chain[-1].users))
            k = self.kind[u]
            direct_bn = k == "bn" and len(chain) == 1 and self._is_conv(chain[0])
            if not (k in only or direct_bn) or len(_tensor_inputs(u)) != 1:
                break
            chain.append(u)
        return chain

    def _anchors(self) -> tuple[str, ...]:
        """Under ``ort-cpu`` a slice or a pad is a kernel too: ONNX Runtime materializes what its Slice and Pad
        write. Under ``generic`` they are views that the kernel reading them looks through."""
        return ANCHORS + (("strided",) if self.target == "ort-cpu" else ())

    def _chains(self) -> dict:
        anchors = self._anchors()
        chains = {n: self._extend([n]) for n in self.nodes if self.kind[n] in anchors and self.kind[n] != "add"}
        fused = set()
        for add in (n for n in self.nodes if self.kind[n] == "add"):
            ins = _tensor_inputs(add)
            cands = [a for a, ch in chains.items() if self._is_conv(a) and a not in fused and ch[-1] in ins
                     and len(ch[-1].users) == 1 and self.target == "generic"]
            if cands:
                a = max(cands, key=lambda c: (self.depth[c], self.index[c]))
                fused.add(a)
                chains[a] = self._extend(chains[a] + [add])
            else:
                chains[add] = self._extend([add])
        return chains

    def _name(self, anchor: fx.Node) -> str:
        return anchor.target if anchor.op == "call_module" else anchor.name

    def reads(self, anchor) -> tuple[list[Read], list[str]]:
        """The tensors the kernel reads (each with the share of its elements it uses) and its ops."""
        chain = self.chains[anchor]
        inside, reads, ops = set(chain), [], []
        for n in chain:
            outside = [a for a in _tensor_inputs(n) if a not in inside]
            if outside and n.op == "call_module":
                ops.append(n.target)
            for a in outside:
                frac, views = self._view_fraction(n, a), []   # a slice that starts a kernel: the share it keeps
                while a not in self.tails:
                    if self.kind[a] not in VIEWS or len(_tensor_inputs(a)) != 1:
                        raise UserError(f"{_describe(n, self.modules)} reads {_describe(a, self.modules)}, which "
                                        f"is inside another kernel; AI-QS cannot say which tensor it reads.")
                    src = _tensor_inputs(a)[0]
                    frac *= self._view_fraction(a, src)
                    views.append(a)
                    a = src
                if self._is_conv(n):   # the rows and columns its windows touch, at this input's size
                    spatial = tuple(n.all_input_nodes[0].meta["tensor_meta"].shape[2:])
                    frac *= conv_read_fraction(self.modules[n.target], spatial)
                ops += [v.target for v in views if v.op == "call_module" and v.target not in ops
                        and self.kind[v] != "slot"]
                reads.append(Read(self.tails[a], frac))
        return reads, ops

    def _view_fraction(self, view: fx.Node, src: fx.Node) -> float:
        if self.kind[view] != "strided":
            return 1.0
        m = self.modules.get(view.target) if view.op == "call_module" else None
        if m is not None and hasattr(m, "read_view"):
            shape = src.meta["tensor_meta"].shape
            used = m.read_view(torch.zeros(shape)).numel()
            return used / _numel(src)
        return min(1.0, _numel(view) / _numel(src))

    def unsigned(self) -> dict:
        """Node -> True where its value cannot be negative."""
        out = {}
        for n in self.nodes:
            k, ins = self.kind[n], _tensor_inputs(n)
            if k == "act+":
                out[n] = True
            elif k in ("slot", "reshape", "strided", "pool", "add", "mul", "cat"):
                out[n] = bool(ins) and all(out.get(a, False) for a in ins)
            else:
                out[n] = False
        return out

    def covered(self):
        """Every op belongs to a kernel, the image's chain, or a read's views."""
        views = set()
        for a in self.chains:
            chain = set(self.chains[a])
            for n in self.chains[a]:
                for x in _tensor_inputs(n):
                    while x not in chain and x not in self.tails and self.kind[x] in VIEWS:
                        views.add(x)
                        x = _tensor_inputs(x)[0]
        done = set(self.owner) | set(self.input_chain) | views
        for n in self.nodes:
            if n not in done and self.kind[n] not in ("const", "output", "placeholder"):
                if self.kind[n] in VIEWS and all(u.op == "output" for u in n.users):
                    continue
                raise UserError(f"AI-QS cannot place {_describe(n, self.modules)} in a kernel: under the "
                                f"{self.target!r} rules it follows no op it can fuse into (a BN must follow a "
                                f"conv directly). Supported: {SUPPORTED}.")


def _kernel_order(an: _Analysis, reads: dict) -> list:
    """Kernels in dependency order (a kernel after the kernels whose tensors it reads: `reads`, anchor -> tensor
    names), ties in the order forward writes their tensors."""
    name = {a: an.tails[ch[-1]] for a, ch in an.chains.items()}
    done, order, todo = {INPUT}, [], sorted(an.chains, key=lambda a: an.index[an.chains[a][-1]])
    while todo:
        ready = next((a for a in todo if reads[a] <= done), None)
        if ready is None:
            raise UserError("the traced graph has a cycle between kernels; AI-QS cannot order them")
        order.append(ready)
        done.add(name[ready])
        todo.remove(ready)
    return order


def _structure(an: _Analysis) -> _Structure:
    an.covered()
    reads = {a: an.reads(a) for a in an.chains}
    order = _kernel_order(an, {a: {r.tensor for r in rs} for a, (rs, _) in reads.items()})
    kernels = []
    for a in order:
        chain = an.chains[a]
        layers = tuple(n.target for n in chain if an.kind[n] == "weight")
        kernels.append(Kernel(an.tails[chain[-1]], layers, tuple(reads[a][0]), an.tails[chain[-1]], tuple(reads[a][1])))
    unsigned = an.unsigned()
    tails = {name: node for node, name in an.tails.items()}
    tensors = [Tensor(INPUT, tails[INPUT].target, True)]
    follows = {}
    for a, k in zip(order, kernels):   # a slice or pad of one tensor, and nothing else: a copy at its width
        if an.kind[a] == "strided" and all(an.kind[n] in VIEWS for n in an.chains[a]) and len(k.reads) == 1:
            follows[k.writes] = follows.get(k.reads[0].tensor, k.reads[0].tensor)
    tensors += [Tensor(k.writes, tails[k.writes].target, not unsigned[tails[k.writes]], follows.get(k.writes))
                for k in kernels]
    pairs = tuple((a.target, an.chains[a][1].target) for a in order
                  if len(an.chains[a]) > 1 and an.kind[an.chains[a][1]] == "bn")   # in kernel order
    return _Structure(tuple(kernels), tuple(tensors), _segments(an, kernels), pairs)


def _segments(an: _Analysis, kernels: list[Kernel]) -> tuple:
    """Cut after each tensor's Slot where it is the only live value; segments without weights join the next."""
    last_use = {n: max((an.index[u] for u in n.users), default=an.index[n]) for n in an.nodes}
    live, cuts = set(), []
    tensor_slots = {node for node in an.tails}
    for n in an.nodes:
        if an.kind[n] == "const" and n.op == "get_attr":
            continue
        live.add(n)
        live = {x for x in live if last_use[x] > an.index[n]}
        if n in tensor_slots and live == {n}:
            cuts.append(an.index[n])
    out_idx = next(an.index[n] for n in an.nodes if n.op == "output")
    bounds = [b for b in cuts if b < out_idx - 1] + [out_idx - 1]
    kernel_of = {n: an.tails[an.chains[a][-1]] for a in an.chains for n in an.chains[a]}
    by_name = {k.name: k for k in kernels}
    groups, start = [], 0
    for b in bounds:
        nodes = [n for n in an.nodes[start:b + 1] if n.op != "output"]
        ks = [k.name for k in kernels if any(kernel_of.get(n) == k.name for n in nodes)]
        groups.append([nodes, ks])
        start = b + 1
    merged = []
    for nodes, ks in groups:
        if merged and not any(by_name[k].layers for k in merged[-1][1]):
            merged[-1][0] += nodes
            merged[-1][1] += ks
        else:
            merged.append([nodes, ks])
    if len(merged) > 1 and not any(by_name[k].layers for k in merged[-1][1]):
        last = merged.pop()
        merged[-1][0] += last[0]
        merged[-1][1] += last[1]
    order = [k.name for k in kernels]
    segs = []
    for i, (nodes, ks) in enumerate(merged):
        ks = sorted(set(ks), key=order.index)
        name = _segment_name(ks, "stem" if i == 0 else "head" if i == len(merged) - 1 else None)
        segs.append((name, tuple(n.name for n in nodes), tuple(ks), nodes[-1].name))
    segs[-1] = segs[-1][:3] + (None,)   # the last one returns what forward returns
    if [k for s in segs for k in s[2]] != order:
        raise UserError("the traced graph's kernels do not run in segment order; AI-QS cannot cache its prefixes")
    return tuple(segs)


def _segment_name(kernels: list[str], end: str | None = None) -> str:
    """The module path its kernels share (a block: ``layer1.0``); the first and last segment without one are the
    ``stem`` and the ``head`` (`end`); else its first kernel, or its first and last."""
    parts = [k.split(".") for k in kernels]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if common and (len(kernels) > 1 or len(common) < len(parts[0])):
        return ".".join(common)
    if end is not None:
        return end
    return kernels[0] if len(kernels) == 1 else f"{kernels[0]}..{kernels[-1]}"


def _insert_slots(gm: fx.GraphModule, analyses: list[_Analysis]):
    """A Slot after every tensor's last op, under any target, where the model has none."""
    tails = []
    for an in analyses:
        tails += [n for n in an.tails if an.kind[n] != "slot" and n not in tails]
    for n in tails:
        path = "q_input" if n.op == "placeholder" else f"q_{n.name}"
        while hasattr(gm, path):
            path += "_"
        gm.add_module(path, Slot())
        with gm.graph.inserting_after(n):
            s = gm.graph.call_module(path, (n,))
        s.meta = dict(n.meta)
        n.replace_all_uses_with(s, delete_user_cb=lambda u: u is not s)
    gm.recompile()


def _adopt_module_tree(gm: nn.Module, src: nn.Module):
    """The model's own module tree (its blocks and containers, in its order, so parameters and state_dict keys keep
    theirs) in place of the plain modules the graph copies, without the weights forward never uses (as the graph
    would have it: an auxiliary classifier only training calls)."""
    used = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    keep = {".".join(t.split(".")[:i]) for t in used for i in range(1, t.count(".") + 2)}

    def prune(m: nn.Module, prefix: str):
        for name, child in list(m._modules.items()):
            path = prefix + name
            if path not in keep and (next(child.parameters(), None) is not None or
                                     next(child.buffers(), None) is not None):
                del m._modules[name]
            elif path not in used:
                prune(child, path + ".")
    gm._modules = dict(src._modules)
    prune(gm, "")


@torch.no_grad()
def trace_model(model: nn.Module, input_shape=(1, 3, 32, 32), model_args: dict | None = None) -> TracedModel:
    """The structure of `model` derived from its traced graph, on a copy whose graph holds a Slot for every
    tensor (see the module docstring). `model` is left as it is."""
    src = copy.deepcopy(model).eval()
    try:
        graph = _Tracer().trace(src)
    except Exception as e:   # fx's own messages name the Python construct (control flow on a tensor, ...)
        raise UserError(f"torch.fx cannot trace {type(model).__name__}: {e}".rstrip(".") + ". AI-QS derives a "
                        "model's structure from its traced graph; make forward traceable (no control flow "
                        "that depends on tensor values).") from None
    gm = TracedModel(src, graph, class_name=type(model).__name__)
    _adopt_module_tree(gm, src)
    param = next(src.parameters(), None)
    x = torch.zeros(input_shape, device=param.device if param is not None else "cpu")
    ShapeProp(gm).propagate(x)
    _modulize(gm)
    _insert_slots(gm, [_Analysis(gm, t) for t in TARGETS])
    gm.aiqs_structure = {t: _structure(_Analysis(gm, t)) for t in TARGETS}
    gm.aiqs_pairs = gm.aiqs_structure[DEFAULT_TARGET].pairs
    gm.model_args = dict(model_args if model_args is not None else getattr(model, "model_args", {}))
    gm.input_shape = tuple(input_shape)
    return gm.train(model.training)
