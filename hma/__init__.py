"""HMA-Serve: disaggregated LLM serving across memory-heterogeneous accelerators.

The offline API follows vLLM: `LLM(model).generate(prompts, SamplingParams(...))`.
"""

from hma.engine import LLM, LLMEngine
from hma.request import CompletionOutput, RequestOutput
from hma.sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput"]
