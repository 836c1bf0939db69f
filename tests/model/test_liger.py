"""Liger-Kernel in Sophia's decoder: how it is wired (here, on the CPU); its numbers are checked on the GPU
(tests/model/test_model_gpu.py), since Liger's kernels run on CUDA only."""
import pytest

pytest.importorskip("liger_kernel")

from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.models.qwen2 import modeling_qwen2  # noqa: E402

from swift_sophia.model import liger  # noqa: E402
from swift_sophia.model.chunking import _ChunkedForward, chunk_rotary_embedding  # noqa: E402
from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration  # noqa: E402


@pytest.fixture
def restore_llama(monkeypatch):
    """Liger replaces module-level functions and classes of the decoder's modeling file (the tiny default's is
    Qwen2; the 8B shape's Llama): put them back after the test."""
    for module, prefix in ((modeling_llama, "Llama"), (modeling_qwen2, "Qwen2")):
        for name in ("apply_rotary_pos_emb", f"{prefix}RMSNorm", f"{prefix}MLP"):
            monkeypatch.setattr(module, name, getattr(module, name))


def test_liger_norms_and_rope_replace_sophias_chunking_and_its_mlp_is_chunked(tiny_model_dir, restore_llama):
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir)
    keys = list(model.state_dict())
    liger.apply_liger_kernel_to_sophia(model)
    decoder = model.model.language_model
    for layer in decoder.layers:
        mlp = layer.mlp.__dict__["forward"]
        assert isinstance(mlp, _ChunkedForward) and liger.is_liger(mlp.forward)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            assert liger.is_liger(norm.forward) and not isinstance(norm.__dict__["forward"], _ChunkedForward)
    assert liger.is_liger(decoder.norm.forward)
    assert chunk_rotary_embedding(decoder, 4)
    assert liger.is_liger(modeling_qwen2.apply_rotary_pos_emb)  # in place: not wrapped by the rotary chunking
    assert list(model.state_dict()) == keys  # checkpoint keys and LoRA targets unchanged


def test_use_liger_kernel_finds_sophia_in_ligers_table(tiny_model_dir, restore_llama):
    """What `swift sft --use_liger_kernel true` runs: transformers' Trainer -> Liger's model-type table."""
    from transformers.integrations.liger import apply_liger_kernel

    import swift_sophia.ms_swift.register  # noqa: F401  (the plugin registers the table entry)

    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir)
    apply_liger_kernel(model, {})
    assert liger.is_liger(model.model.language_model.layers[0].input_layernorm.forward)


def test_liger_setting_without_cuda_leaves_the_model_as_it_is(tiny_model_dir, monkeypatch, restore_llama):
    monkeypatch.setenv("SOPHIA_LIGER_KERNEL", "1")
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert model.config.liger_kernel
    assert not liger.is_liger(model.model.language_model.layers[0].input_layernorm.forward)
