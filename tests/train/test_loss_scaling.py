"""sync_loss weights each rank's loss so that DDP's gradient average is the gradient of the global mean.

The ranks are threads sharing a fake all-reduce (no process group): fast, and the arithmetic is the same."""

from __future__ import annotations

import threading

import pytest
import torch

from lmmkit.data.collate import pad_batch
from lmmkit.data.templates import IGNORE_INDEX
from lmmkit.train.distributed import SyncedLoss, sync_loss
from lmmkit.train.loop import LMObjective, labelled_targets


class ThreadGroup:
    """`world` fake accelerators whose reduce(..., "sum") sums what every thread passed in."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.sent: dict[int, torch.Tensor] = {}

    def member(self, rank: int) -> FakeAccelerator:
        return FakeAccelerator(self, rank)


class FakeAccelerator:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank = group, rank
        self.num_processes = group.world
        self.device = torch.device("cpu")

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        self.group.sent[self.rank] = tensor.clone()
        self.group.barrier.wait()
        total = sum(self.group.sent[r] for r in range(self.group.world))
        self.group.barrier.wait()  # everyone has read before anything is overwritten
        return total


def _run_ranks(world: int, fn) -> list:
    group = ThreadGroup(world)
    out: list = [None] * world
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            out[rank] = fn(group.member(rank), rank)
        except BaseException as err:  # surfaced below, not lost in the thread
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def _token_losses(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x @ w).pow(2)  # one loss per "token"


@pytest.mark.parametrize("counts", [(3, 7, 1), (5, 5, 5), (4, 0, 2)])
def test_weighted_ranks_average_to_the_global_mean_gradient(counts: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    w0 = torch.randn(4)
    xs = [torch.randn(n, 4) for n in counts]
    extras = [{"metric": float(i)} for i in range(len(counts))]

    def rank(acc: FakeAccelerator, r: int) -> tuple[SyncedLoss, torch.Tensor]:
        w = w0.clone().requires_grad_()
        loss = _token_losses(w, xs[r]).mean()  # NaN on a rank with no tokens, as the LM loss is
        synced = sync_loss(acc, loss, extras[r], units=counts[r], tokens=10 * counts[r])
        synced.loss.backward()
        return synced, w.grad

    results = _run_ranks(len(counts), rank)
    ddp_grad = sum(g for _, g in results) / len(counts)  # what DDP's all-reduce leaves on every rank

    w = w0.clone().requires_grad_()
    global_loss = _token_losses(w, torch.cat(xs)).mean()
    global_loss.backward()
    torch.testing.assert_close(ddp_grad, w.grad, rtol=1e-6, atol=1e-7)
    total = sum(counts)
    for synced, _ in results:
        assert synced.value == pytest.approx(global_loss.item(), rel=1e-6)
        assert synced.tokens == 10 * total
        # The objective's metrics are averaged with the loss's weights.
        assert synced.extra["metric"] == pytest.approx(sum(i * n for i, n in enumerate(counts)) / total)


def test_without_units_every_rank_weighs_the_same() -> None:
    """An objective that says nothing (DPO: a per-pair mean, equally many pairs per rank) keeps DDP's plain
    average: the loss is not touched, and the logged value is the mean of the ranks' values."""
    values = [1.0, 3.0]

    def rank(acc: FakeAccelerator, r: int) -> tuple[SyncedLoss, torch.Tensor]:
        loss = torch.tensor(values[r])
        return sync_loss(acc, loss, {}, units=None, tokens=7), loss

    for synced, loss in _run_ranks(2, rank):
        assert synced.loss is loss
        assert synced.value == 2.0 and synced.tokens == 14 and synced.extra == {}


def test_labelled_targets_is_what_the_lm_loss_averages_over() -> None:
    """The LLM's mean loss times labelled_targets is its summed token loss: the unit the weighting needs
    (position 0 predicts nothing; padding and image positions are unlabelled)."""
    from lmmkit.models.build import build_vlm

    torch.manual_seed(0)
    model = build_vlm("shipped:lm", "shipped:vision", seed=0)
    vocab = model.llm.config.vocab_size
    rows = []
    for n, first_label in ((12, 5), (20, 3), (7, 0)):
        ids = torch.randint(5, vocab, (n,)).tolist()
        labels = [IGNORE_INDEX] * first_label + ids[first_label:]
        rows.append((ids, labels))
    batch = pad_batch(rows, model.tokenizer.pad_token_id)
    assert labelled_targets(batch) == (12 - 5) + (20 - 3) + (7 - 1)
    with torch.no_grad():
        out = model(**batch)
    logits, targets = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    summed = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                               reduction="sum")
    torch.testing.assert_close(out.loss * labelled_targets(batch), summed, rtol=1e-5, atol=1e-5)
    assert LMObjective().loss_units(batch) == labelled_targets(batch)
