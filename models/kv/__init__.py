"""KV-cache compression: policies (ScaleKV, HACK, ...), calibration profiles and the memory/fidelity report."""
