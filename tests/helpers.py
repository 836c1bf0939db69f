"""Small builders shared by the model tests."""
import torch


def video_prompt(tokenizer, frames, tokens_per_frame, before="<|im_start|>user\n",
                 after="What color?<|im_end|>\n<|im_start|>assistant\n"):
    ids = tokenizer.convert_tokens_to_ids(["<vid>", "<VIDEO_CONTEXT>", "</vid>"])
    return (tokenizer.encode(before) + [ids[0]] + [ids[1]] * (frames * tokens_per_frame) + [ids[2]]
            + tokenizer.encode(after))


def left_pad(rows, pad_id):
    n = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def model_and_template(model_dir, mode="transformers"):
    """The model in eval mode and its `sophia` template in `mode`, holding the model (as ms-swift's engines do)."""
    from swift.model import get_model_processor
    from swift.template import get_template

    import swift_sophia.ms_swift.register  # noqa: F401

    model, processor = get_model_processor(model_dir, model_type="sophia")
    template = get_template(processor, template_type="sophia")
    template.set_mode(mode)
    template.model = model
    return model.eval(), template
