"""The device side: assembling a service over a loaded model, the device threads and their CPU
policy, packing, pooling and CUDA graphs. Runs in the process that owns the model."""
