"""The measurement harness, on top of the core: bench, whole-run replay, the decoder, the peers.

- `harness.methods`: the one method protocol (plan, run, graph-capturable, traffic) that the
  bench, the replay and autotune's measurements share; `harness.registry` names every method
  and parses ``--methods`` lists; `harness.deft_methods` (this project's strategies),
  `harness.sglang` and `harness.peers` implement it;
- `harness.bench`: `deft-cli bench`, one call per workload against a measured floor;
- `harness.replay`: `deft-cli replay`, a whole decoding run step by step (the paper's
  Tables 3 and 4), with `harness.decoder`, a Llama-3-8B-shaped model;
- `harness.timing`: eager and CUDA-graph timing; `harness.kernel_traffic`: bytes of a plan.
- `harness.report_views`: `deft-cli inspect`'s tree view and `workloads list`'s table.

The core (`deft`), `reference` and `iomodel` never import this package.
"""
