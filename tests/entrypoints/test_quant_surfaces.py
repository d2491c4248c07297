"""/v1/models cards and /metrics info gauges name the quantization and KV-cache dtype."""

from types import SimpleNamespace

import torch

from pagedllm.entrypoints.openai.metrics import PrometheusStatLogger
from pagedllm.entrypoints.openai.serving_models import OpenAIServingModels


def test_model_card_fields():
    card = OpenAIServingModels(["m"], "/models/m", 4096, quantization="compressed-tensors",
                               kv_cache_dtype="fp8").get_model("m")
    assert card["quantization"] == "compressed-tensors" and card["kv_cache_dtype"] == "fp8"
    assert OpenAIServingModels(["m"], "/r", 8).card("m")["quantization"] is None


def test_info_gauges():
    config = SimpleNamespace(
        cache_config=SimpleNamespace(block_size=16, kv_cache_dtype="fp8_e4m3",
                                     enable_prefix_caching=True, gpu_memory_utilization=0.9),
        model_config=SimpleNamespace(dtype=torch.bfloat16, quantization=None))
    logger = PrometheusStatLogger("m", 2048)
    logger.set_config_info(config, 777)
    text = logger.render().decode()
    assert ('pagedllm:model_config_info{dtype="bfloat16",kv_cache_dtype="fp8_e4m3",'
            'model_name="m",quantization="none"} 1.0') in text
    assert ('pagedllm:cache_config_info{block_size="16",cache_dtype="fp8_e4m3",'
            'enable_prefix_caching="True",gpu_memory_utilization="0.9",num_gpu_blocks="777"} '
            '1.0') in text
