"""The offline tiny model and tokenizer, and per-token log-probs against a naive computation."""
import pytest
import torch

from models.loading import load_policy
from models.policy import completion_logprobs, completion_mask, pack, prompt_groups, right_to_left
from models.tiny import build_tiny_model, build_tokenizer
from problems.arithmetic import VOCAB_WORDS, generate_problems
from problems.prompts import plain_prompt


def test_tokenizer_round_trips_exactly_and_keeps_digits_apart(tiny):
    _, tok = tiny
    for p in generate_problems(20, seed=0):
        text = plain_prompt(p["question"]) + p["solution"]
        assert tok.decode(tok(text)["input_ids"]) == text
    odd = "Hello, World! x=1,024 -> {ok}\n\tno?"
    assert tok.decode(tok(odd)["input_ids"]) == odd.replace("\t", "<unk>")  # tab is outside the vocabulary
    pieces = tok.convert_ids_to_tokens(tok("Mia has 12 apples.\n12*3=36")["input_ids"])
    assert pieces == ["Mia", " has", " 1", "2", " apples", ".", "\n", "1", "2", "*", "3", "=", "3", "6"]


def test_tokenizer_is_about_half_as_long_as_characters(tiny):
    _, tok = tiny
    texts = [plain_prompt(p["question"]) + p["solution"] for p in generate_problems(50, seed=1)]
    ratio = sum(len(tok(t)["input_ids"]) for t in texts) / sum(len(t) for t in texts)
    assert ratio < 0.5


def test_tiny_model_is_deterministic_and_about_a_million_parameters():
    tok = build_tokenizer(VOCAB_WORDS)
    a, b = build_tiny_model(tok, seed=3), build_tiny_model(tok, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert 0.8e6 < sum(p.numel() for p in a.parameters()) < 1.5e6


def test_saved_tiny_model_loads_through_the_generic_auto_path(tiny_dir):
    model, tok = load_policy(str(tiny_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.padding_side == "left" and tok.pad_token == "<pad>" and tok.eos_token == "<eos>"
    assert (tiny_dir / "model.safetensors").exists()


def test_pack_left_pads_and_positions_start_at_zero():
    pb = pack([[5, 6], [7]], [[8], [9, 10, 11]], pad_id=0)
    assert pb.input_ids.tolist() == [[0, 5, 6, 8], [7, 9, 10, 11]]
    assert pb.attention_mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert pb.position_ids.tolist() == [[0, 0, 1, 2], [0, 1, 2, 3]]
    assert pb.completion_lens.tolist() == [1, 3]


def test_completion_mask_is_true_on_each_rows_first_tokens():
    mask = completion_mask(torch.tensor([2, 0, 3]), 3)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert completion_mask(torch.tensor([], dtype=torch.long), 4).shape == (0, 4)


def test_right_to_left_alignment():
    x = torch.tensor([[0.0, 0.0, 1.0], [2.0, 3.0, 4.0]])
    assert right_to_left(x, torch.tensor([1, 3])).tolist() == [[1.0, 0.0, 0.0], [2.0, 3.0, 4.0]]


def _naive(model, prompt, completion):
    logits = model(torch.tensor([prompt + completion])).logits[0].float()
    lsm = torch.log_softmax(logits, -1)
    idx = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return lsm[idx, torch.tensor(completion)]


@pytest.mark.parametrize("micro_batch_size", [None, 2])
def test_completion_logprobs_match_naive(tiny, micro_batch_size):
    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    comps = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (4, 1, 6, 0)]
    logp, mask, ent = completion_logprobs(model, prompts, comps, pad_id=tok.pad_token_id,
                                          micro_batch_size=micro_batch_size, return_entropy=True)
    assert logp.shape == (4, 6) and mask.sum(1).tolist() == [4, 1, 6, 0]
    for i, (p, c) in enumerate(zip(prompts, comps)):
        if c:
            assert torch.allclose(logp[i, : len(c)], _naive(model, p, c), atol=1e-5)
        assert (logp[i, len(c):] == 0).all()
    assert (ent[mask] > 0).all() and (ent[mask] <= torch.log(torch.tensor(float(len(tok)))) + 1e-4).all()


def test_completion_logprobs_with_grad_flows_to_parameters(tiny):
    model, tok = tiny
    logp, mask, _ = completion_logprobs(model, [[5, 6, 7]], [[8, 9]], pad_id=tok.pad_token_id, with_grad=True)
    (logp * mask).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("micro_batch_size", [None, 3])
def test_rows_sharing_a_prompt_run_it_once_and_match_naive(tiny, micro_batch_size):
    """GRPO's layout (groups of rows with one prompt) takes the shared-prompt path; micro-batches of 3 cut
    through groups of 2, and one group holds an empty completion."""
    model, tok = tiny
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (6, 4, 9)]
    rows_p = [p for p in prompts for _ in range(2)]
    comps = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (3, 5, 1, 0, 7, 2)]
    assert prompt_groups(rows_p) == [0, 0, 1, 1, 2, 2]
    logp, mask, ent = completion_logprobs(model, rows_p, comps, pad_id=tok.pad_token_id,
                                          micro_batch_size=micro_batch_size, return_entropy=True)
    assert logp.shape == (6, 7) and mask.sum(1).tolist() == [3, 5, 1, 0, 7, 2]
    for i, (p, c) in enumerate(zip(rows_p, comps)):
        if c:
            assert torch.allclose(logp[i, : len(c)], _naive(model, p, c), atol=1e-5)
        assert (logp[i, len(c):] == 0).all() and (ent[i, len(c):] == 0).all()


def test_shared_prompt_gradients_equal_the_packed_layouts(tiny):
    model, tok = tiny
    rows_p = [[5, 6, 7, 8]] * 3 + [[9, 10]] * 3
    comps = [[11, 12], [13], [14, 15, 16], [17], [18, 19], [20]]
    grads = []
    for micro_batch_size in (None, 1):  # the whole batch: groups share their prompt; one row a forward: none do
        logp, mask, _ = completion_logprobs(model, rows_p, comps, pad_id=tok.pad_token_id, with_grad=True,
                                            micro_batch_size=micro_batch_size)
        (logp * mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_prefix_passes_score_no_prompt_position(tiny):
    """The shared prompts' passes (the update's and sampling's) are run for their KV cache: the LM head sees one
    position per prompt there, and otherwise only each run's completion positions (+1 for the last prompt token)."""
    from models.generation import shared_prompt_cache

    model, tok = tiny
    rows_p = [[5, 6, 7, 8, 9, 10]] * 2 + [[9, 10, 11]] * 2
    comps = [[11, 12], [13], [14, 15, 16], [17]]
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[:2]))
    try:
        completion_logprobs(model, rows_p, comps, pad_id=tok.pad_token_id)
        assert head_rows[0] == (2, 1)  # the prefix pass of the 2 groups: 1 position each, not 5
        # then the rows' own positions (last prompt token + completion), padded at most to the longest row
        assert sum(b * t for b, t in head_rows[1:]) <= len(comps) * (max(len(c) for c in comps) + 1)
        head_rows.clear()
        with torch.no_grad():
            shared_prompt_cache(model, pack([[5, 6, 7, 8, 9, 10], [9, 10, 11]], [[], []], tok.pad_token_id), n=2)
        assert head_rows == [(2, 1)]
    finally:
        hook.remove()


def test_length_runs_keep_every_rows_logprobs_and_gradient(tiny):
    """Rows 2 to 100 tokens long go through several runs (length_runs); log-probs and gradients equal the
    packed layout's, row by row in the caller's order."""
    from models.policy import length_runs

    model, tok = tiny
    g = torch.Generator().manual_seed(2)
    lens = [2, 100, 40, 1, 60, 95]
    assert len(length_runs(lens)) > 1
    rows_p = [[5, 6, 7, 8]] * 3 + [[9, 10]] * 3
    comps = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in lens]
    outs = []
    for micro_batch_size in (None, 1):
        logp, mask, _ = completion_logprobs(model, rows_p, comps, pad_id=tok.pad_token_id, with_grad=True,
                                            micro_batch_size=micro_batch_size)
        (logp * mask).sum().backward()
        outs.append((logp.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
        model.zero_grad(set_to_none=True)
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5)


def test_length_runs_cut_where_padding_plus_run_cost_is_least():
    from models.policy import length_runs

    # sorted 1,1,1,2,2,3: one run pads to 6 x 3 = 18 positions; with free runs, one per length: 3 + 4 + 3 = 10
    assert length_runs([2, 1, 3, 1, 2, 1], run_cost=0) == [[1, 3, 5], [0, 4], [2]]
    # a run costing 2 positions: three runs 10 + 6 = 16, two (the 1s | the rest) 3 + 9 + 4 = 16: fewer runs win a tie
    assert length_runs([2, 1, 3, 1, 2, 1], run_cost=2) == [[1, 3, 5], [0, 4, 2]]
    # 7 rows at the limit and 9 shorter ones (a race step's shape): 2048 positions in one run, 1657 + 4 x 32 in four
    lens = [128] * 7 + [30, 45, 60, 70, 75, 85, 95, 110, 120]
    assert [[lens[i] for i in run] for run in length_runs(lens)] == [
        [30, 45], [60, 70, 75], [85, 95], [110, 120] + [128] * 7]
    assert length_runs(lens, max_runs=1) == [list(range(16))]
    assert length_runs([128] * 16) == [list(range(16))]  # nothing to save
    assert length_runs([]) == [[]] and length_runs([4]) == [[0]]
    many = length_runs([(7 * i) % 1000 + 1 for i in range(512)])  # cuts searched at 64 places only
    assert len(many) == 4 and sorted(i for run in many for i in run) == list(range(512))


def test_under_fsdp2_every_micro_batch_is_one_forward(tiny_dir):
    """Each FSDP2 forward is a collective, so a rank must not run as many forwards as its rows' lengths ask
    for (a prefix pass, then length runs): under `fully_shard` a micro-batch is one packed forward, with or
    without a graph, and gives the unsharded model's log-probs."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from models.fsdp import shard

    model, tok = load_policy(str(tiny_dir))
    rows_p = [[5, 6, 7, 8]] * 3 + [[9, 10]] * 3
    comps = [[11] * n for n in (2, 100, 40, 1, 60, 95)]  # several length runs without FSDP
    expected, _, _ = completion_logprobs(model, rows_p, comps, pad_id=tok.pad_token_id)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        sharded = shard(model, init_device_mesh("cpu", (1,)))
        forwards = []
        sharded.register_forward_hook(lambda *_: forwards.append(1))
        for with_grad in (False, True):
            forwards.clear()
            logp, _, _ = completion_logprobs(sharded, rows_p, comps, pad_id=tok.pad_token_id, with_grad=with_grad,
                                             micro_batch_size=3)
            assert len(forwards) == 2  # 6 rows in micro-batches of 3
            assert torch.allclose(logp.detach(), expected, atol=1e-5)
    finally:
        dist.destroy_process_group()
