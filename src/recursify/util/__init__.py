"""Small shared pieces with no recursify imports: device and dtype resolution, memory estimates.

The help texts of `--device` and `--dtype` live here, torch-free, so the command line can show them
without importing torch."""

DEVICE_HELP = "Device: auto (cuda if available, else cpu), cpu, cuda or cuda:N."
DTYPE_HELP = ("Dtype of the weights and compute: auto (bfloat16 on a GPU that supports it, float32 on CPU), "
              "float32, bfloat16 or float16. Conversion maths stays in float32/float64.")
