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
