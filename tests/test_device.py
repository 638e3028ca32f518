"""fvgpt_cache.device: text features do not depend on the process's thread count."""
import torch

from fvgpt_cache.device import one_cpu_thread
from fvgpt_cache.extraction import class_prompt, encode_texts


def test_text_is_encoded_on_one_thread_whatever_the_process_uses(tiny_model, monkeypatch):
    """torchrun gives each rank one thread, a single process uses every core, and a CPU matrix product
    may sum in another order with another thread count: so `encode_texts` always encodes on one CPU
    thread, and a 2-rank extraction writes the single process's `/text/clip` bit for bit.
    Break used: drop the `with one_cpu_thread(device)` in `extraction.encode_texts` (this test then sees 3
    threads inside encode_text)."""
    seen = []
    encode = tiny_model.model.encode_text

    def spy(tokens):
        seen.append(torch.get_num_threads())
        return encode(tokens)

    monkeypatch.setattr(tiny_model.model, "encode_text", spy)
    texts = [class_prompt("a photo of a {}.", name) for name in ("circle", "square", "star")]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        many = encode_texts(tiny_model, texts, torch.device("cpu"), batch_size=2)
        assert seen == [1, 1] and torch.get_num_threads() == 3, "one thread inside, the caller's count restored"
        torch.set_num_threads(1)
        one = encode_texts(tiny_model, texts, torch.device("cpu"), batch_size=2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(many, one)


def test_one_cpu_thread_restores_the_count_after_an_error_and_leaves_other_devices_alone():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        try:
            with one_cpu_thread(torch.device("cpu")):
                assert torch.get_num_threads() == 1
                raise KeyError("inside")
        except KeyError:
            pass
        assert torch.get_num_threads() == 2
        with one_cpu_thread(torch.device("meta")):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
