"""Device backends: each provides the ops of a transformer block on its device.

`cpu.CpuBackend` is the reference (Numba/numpy, weights read from the memory map); a device
backend provides the same methods (load_matrix, load_vector, kv_cache, from_host, to_host,
matmul, rms_norm, rope, store_kv, attention, glu, add) and `model.PyBlock` runs on it unchanged.
"""
