"""Wall and CPU time of the first completion, where ``--numa migrate`` places the weights (cold page cache).

    python build/numa_vm.py --nodes 2 --cpus-per-node 2 -- .venv/bin/python -P build/first_graph_time.py 4

Root (it drops the page cache). Prints one JSON line: the first ``create_completion``'s wall and process CPU
seconds (``os.times``: every thread's), the placement's own seconds from the stats, and the pages placed and
moved. Compute threads that spin while thread 0 places show up as CPU time, not as wall time.
"""

from __future__ import annotations

import json
import os
import sys
import time

from llama_cpp import Llama

from numa_llama import api
from numa_llama.models import resolve_model


def main() -> int:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count() or 1
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    l0, lw0 = os.times(), time.perf_counter()
    llm = Llama(
        str(resolve_model(None)), numa="migrate", n_threads=threads, n_threads_batch=threads, n_ctx=128, verbose=False
    )
    l1, lw1 = os.times(), time.perf_counter()
    llm.create_completion("The capital of France is", max_tokens=1, temperature=0.0, top_k=1)
    c1, w1 = os.times(), time.perf_counter()
    st = api.stats(llm)
    cpu = (c1.user - l1.user) + (c1.system - l1.system)
    print(
        json.dumps(
            {
                "threads": threads,
                "wall_s": w1 - lw1,
                "cpu_s": cpu,
                "cpu_per_wall": cpu / (w1 - lw1),
                "place_s": st.place_seconds,
                "load_wall_s": lw1 - lw0,
                "load_cpu_s": (l1.user - l0.user) + (l1.system - l0.system),
                "pages": st.pages,
                "moved": st.pages_moved,
            }
        )
    )
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
