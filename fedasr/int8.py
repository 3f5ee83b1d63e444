"""Checks of an int8 export that need no torch (they run under an emulated CPU, too):
:func:`int8_can_saturate` reads a quantised model's weights, :func:`int8_matmul_errors`
runs each of its quantised MatMuls in onnxruntime against the bound its quantisation
guarantees. The quantisation itself is :func:`fedasr.export._quantize_int8`."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def int8_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The quantised MatMul weights of an int8 model (``*_quantized`` initializers), as integers."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    return {t.name[: -len("_quantized")]: numpy_helper.to_array(t) for t in g.initializer
            if t.name.endswith("_quantized")}


def int8_can_saturate(path: str | Path) -> bool:
    """Whether onnxruntime's U8S8 kernel on an x86-64 CPU without VNNI can saturate on this int8
    model: it adds pairs of uint8 x int8 products into int16 (vpmaddubsw), which overflows when
    2 x 255 x |w| > 32767, i.e. for int8 weights outside [-64, 64]. uint8 weights (U8U8) are
    multiplied in int16 after widening: they never saturate."""
    for q in int8_weights(path).values():
        if q.dtype == np.int8 and int(np.abs(q.astype(np.int16)).max()) > 64:
            return True
    return False


def int8_matmul_errors(fp32: str | Path, int8: str | Path, feeds: dict[str, np.ndarray]) -> list[dict]:
    """Each quantised MatMul of ``int8`` run by onnxruntime on the activations the fp32 model
    computes from ``feeds``, against the exact product and the bound the quantisation
    guarantees: with x̂ = s_x(q_x - z_x) (dynamic, per call: |x - x̂| <= s_x/2) and
    Ŵ = s_w(q_w - z_w) (|W - Ŵ| <= s_w/2),

        |y_j - ŷ_j| <= s_w/2 · Σ_i |x_i| + s_x/2 · Σ_i |W_ij| + K · s_x s_w / 4

    (+ float32 rounding of the reference and of the final scaling). Integer accumulation is
    exact unless the kernel saturates, which is what breaks the bound. Returns one row per
    MatMul: name, max error, the largest error/bound ratio, elements over their bound, max |y|."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    fp = onnx.load(str(fp32))
    weights = {t.name: numpy_helper.to_array(t) for t in fp.graph.initializer}
    mats = [(n.input[0], n.input[1]) for n in fp.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    q = onnx.load(str(int8))
    qinit = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    known = {o.name for o in fp.graph.output}
    for x, _ in mats:
        if x not in known:
            fp.graph.output.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, None))
            known.add(x)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(fp.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    acts = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    rows = []
    for x_name, w_name in mats:
        if f"{w_name}_quantized" not in qinit:
            continue
        wq, ws, wz = (qinit[f"{w_name}_{s}"] for s in ("quantized", "scale", "zero_point"))
        x = acts[x_name].astype(np.float32)
        x2 = x.reshape(-1, x.shape[-1])
        w = weights[w_name].astype(np.float64)
        graph = helper.make_graph(
            [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "wq", "xz", "wz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "ws"], ["s"]),
             helper.make_node("Mul", ["accf", "s"], ["y"])], "one_matmul",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, x2.shape[1]])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(ws, "ws"), numpy_helper.from_array(wz, "wz")])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = q.ir_version
        y = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
            None, {"x": x2})[0].astype(np.float64)
        exact = x2.astype(np.float64) @ w
        lo, hi = min(0.0, float(x2.min())), max(0.0, float(x2.max()))
        sx = (hi - lo) / 255.0
        sw = np.broadcast_to(np.asarray(ws, np.float64).reshape(-1), (w.shape[1],))
        absx = np.abs(x2).sum(1, keepdims=True)
        bound = (sw / 2) * absx + (sx / 2) * np.abs(w).sum(0) + w.shape[0] * sx * sw / 4
        bound = bound + 1e-5 * (np.abs(x2) @ np.abs(w)) + 1e-6 * np.abs(exact)  # float32 rounding
        err = np.abs(y - exact)
        rows.append({"name": w_name, "max_error": float(err.max()), "worst_ratio": float((err / bound).max()),
                     "violations": int((err > bound).sum()), "max_abs": float(np.abs(exact).max())})
    return rows
