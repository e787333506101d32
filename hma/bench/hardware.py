"""Accelerators the cost planner can deploy: datasheet rates, memory, an hourly price, and sources.

Rates are dense (no 2:4 sparsity) tensor rates from each vendor's public material; None means
the card has no such unit, or no figure was found to cite. Hourly prices are what one card costs
to rent, from RunPod's published serverless prices (always-on "active" workers, per second x
3,600), the one public price list found that covers most of these cards; the Blackhole card is
not rented anywhere found, so its price is its list price spread over three years plus 300 W of
power, which leaves out the host and is not comparable with a rental. Checked 2026-11-23.
"""

from __future__ import annotations

from dataclasses import dataclass

RUNPOD = "https://docs.runpod.io/serverless/pricing (active worker, per second x 3600)"


@dataclass(frozen=True, slots=True)
class Accelerator:
    """One card: memory, bandwidth (bytes/s), dense tensor rates (FLOP/s), price ($/h), sources."""

    name: str
    memory_bytes: float
    bandwidth: float
    bf16_flops: float
    fp8_flops: float | None
    int8_ops: float | None
    dollars_per_hour: float | None
    spec_source: str
    price_source: str

    def peak(self, precision: str) -> float | None:
        """The dense tensor rate prefill runs at in this precision (bfp8 runs at the 8-bit rate)."""
        return {"bf16": self.bf16_flops, "fp8": self.fp8_flops, "int8": self.int8_ops,
                "bfp8": self.fp8_flops}[precision]


T, G = 1e12, 1e9
ACCELERATORS = {a.name: a for a in (
    Accelerator("H100", 80 * G, 3.35 * T, 989 * T, 1979 * T, 1979 * T, 0.00093 * 3600,
                "https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM datasheet)", RUNPOD + ", H100 PRO"),
    Accelerator("H200", 141 * G, 4.8 * T, 989 * T, 1979 * T, 1979 * T, 0.00124 * 3600,
                "https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM datasheet)", RUNPOD + ", H200 PRO"),
    Accelerator("L40S", 48 * G, 0.864 * T, 362 * T, 733 * T, 733 * T, 0.00037 * 3600,
                "https://www.nvidia.com/en-us/data-center/l40s/ (L40S datasheet)", RUNPOD + ", L40S"),
    Accelerator("RTX4090", 24 * G, 1.008 * T, 165 * T, 330 * T, 661 * T, 0.00021 * 3600,
                "NVIDIA Ada GPU architecture whitepaper, appendix A (FP32 accumulate)", RUNPOD + ", 4090 PRO"),
    Accelerator("A10", 24 * G, 0.6 * T, 125 * T, None, 250 * T, None,
                "https://www.nvidia.com/en-us/data-center/products/a10-gpu/ (A10 datasheet)",
                "not listed by RunPod; no public price found to cite"),
    Accelerator("L20", 48 * G, 0.864 * T, None, None, None, None,
                "48 GB GDDR6, 864 GB/s (third-party listings); tensor rates not found in public material",
                "no public price found to cite"),
    Accelerator("Blackhole", 32 * G, 0.512 * T, 372 * T, 745 * T, None, 1399 / (3 * 8760) + 0.3 * 0.15,
                "https://docs.tenstorrent.com/aibs/blackhole/ (p150a: 32 GB, 512 GB/s); FP8 745 / FP16 372 "
                "TFLOPS from Tenstorrent's Hot Chips 2024 talk as reported by The Register",
                "p150a list price $1,399 over 3 years + 300 W at $0.15/kWh (card only, no host)"),
)}
