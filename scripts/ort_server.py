"""ONNX Runtime timing server for `emo bench --compare-onnx` (reads commands on stdin).

Protocol: first line of output is "ready <input shape>"; then each input line "run K" makes it
time K runs and answer one line of K latencies in milliseconds.
"""
import sys
import time

import numpy as np
import onnxruntime as ort

path, threads = sys.argv[1], int(sys.argv[2])
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
inp = sess.get_inputs()[0]
shape = [d if isinstance(d, int) else 1 for d in inp.shape]
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
print("ready " + "x".join(map(str, shape)), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if not cmd:
        continue
    if cmd[0] == "run":
        times = []
        for _ in range(int(cmd[1])):
            t = time.perf_counter()
            sess.run(None, {inp.name: x})
            times.append((time.perf_counter() - t) * 1e3)
        print(" ".join(f"{t:.4f}" for t in times), flush=True)
    elif cmd[0] == "quit":
        break
