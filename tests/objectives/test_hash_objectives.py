"""The hashing family's objectives: supervised (DCMH), instance-level (with distillation), the binary-code
terms and nested codes. Each equals one process at the doubled batch under 2-process gloo DDP, ranks aligned
pairs below shuffled ones, and its gradient moves the relaxed codes towards what it asks of them."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.objectives.binary import binary_target, bit_balance, quantisation, straight_through
from pipeline.objectives.instance import distillation, instance_loss
from pipeline.objectives.nested import nested_loss
from pipeline.objectives.supervised import dcmh_loss, pairwise_likelihood
from pipeline.objectives.ucch import MemoryBankContrast
from tests.helpers.ddp import WORLD, assert_equal_results, single_process, two_processes

B, D_IN, BITS = 6, 10, 32


def _inputs():
    g = torch.Generator().manual_seed(0)
    x_img, x_txt = torch.randn(WORLD * B, D_IN, generator=g), torch.randn(WORLD * B, D_IN, generator=g)
    ids = torch.arange(WORLD * B)
    ids[3] = ids[8]  # one image twice, once per rank: not a negative of itself
    labels = (torch.arange(WORLD * B)[:, None] % torch.tensor([2, 3, 5])[None, :] == 0).float()
    labels[7] = 0  # an image without labels: left out of its pairs
    teacher = F.normalize(torch.randn(2, WORLD * B, 8, generator=g), dim=2)
    return x_img, x_txt, ids, labels, teacher


def _loss_of(name, rows):
    torch.manual_seed(1)
    img_head, txt_head = torch.nn.Linear(D_IN, BITS), torch.nn.Linear(D_IN, BITS)
    x_img, x_txt, ids, labels, teacher = _inputs()
    hx, hy = torch.tanh(img_head(x_img[rows])), torch.tanh(txt_head(x_txt[rows]))
    ids, labels, teacher = ids[rows], labels[rows], (teacher[0][rows], teacher[1][rows])
    bank = MemoryBankContrast(WORLD * B, BITS, tau=0.9, momentum=0.4, num_negatives=16, seed=3)

    def ucch(x, y):
        return bank.loss(x, ids, 5, False, y) + bank.loss(y, ids, 5, False, x), {}

    losses = {
        "dcmh": lambda: dcmh_loss(hx, hy, labels, 0.5, 1.0, 1.0)[0],
        "balance": lambda: bit_balance(hx) + bit_balance(hy),
        "quantisation": lambda: quantisation(hx, binary_target(hx, hy)) + quantisation(hy, binary_target(hx, hy)),
        "instance": lambda: instance_loss(hx, hy, ids, 12.0, 0.1)[0],
        "instance_distilled": lambda: instance_loss(hx, hy, ids, 12.0, 0.1, teacher, 1.0, 20.0)[0],
        "nested_instance": lambda: nested_loss(lambda x, y: instance_loss(x, y, ids, 12.0, 0.1), hx, hy,
                                               [8, 16, BITS])[0],
        "nested_dcmh": lambda: nested_loss(lambda x, y: dcmh_loss(x, y, labels, 0.5, 1.0, 1.0), hx, hy, [16, BITS])[0],
        "nested_ucch": lambda: nested_loss(ucch, hx, hy, [8, 16, BITS])[0],
    }
    return losses[name](), [*img_head.parameters(), *txt_head.parameters()]


NAMES = ["dcmh", "balance", "quantisation", "instance", "instance_distilled", "nested_instance", "nested_dcmh",
         "nested_ucch"]


@pytest.fixture(scope="module")
def ddp_results():
    return two_processes(_loss_of, NAMES, B)


@pytest.mark.parametrize("name", NAMES)
def test_ddp_equals_single_process_at_doubled_batch(name, ddp_results):
    assert_equal_results(ddp_results[name], single_process(_loss_of, name, B))


# ---------------------------------------------------------------- aligned below shuffled

def _class_codes(n=16, classes=4, noise=0.1, seed=3):
    """Image codes grouped by class, each caption's code near its image's; one-hot labels."""
    g = torch.Generator().manual_seed(seed)
    labels = F.one_hot(torch.arange(n) % classes, classes).float()
    img = torch.tanh(2 * labels @ torch.randn(classes, BITS, generator=g) + noise * torch.randn(n, BITS, generator=g))
    txt = torch.tanh(torch.atanh(img.clamp(-0.99, 0.99)) + noise * torch.randn(n, BITS, generator=g))
    return img, txt, labels


NEXT = torch.roll(torch.arange(16), 1)  # every caption moved to another image (of another class)


def test_dcmh_is_lower_for_aligned_than_for_shuffled_pairs():
    img, txt, labels = _class_codes()
    aligned, _ = dcmh_loss(img, txt, labels, 0.5, 1.0, 1.0)
    shuffled, _ = dcmh_loss(img, txt[NEXT], labels, 0.5, 1.0, 1.0)
    assert aligned < shuffled - 0.05, (aligned, shuffled)


@pytest.mark.parametrize("nested", [False, True])
def test_instance_loss_is_lower_for_aligned_than_for_shuffled_pairs(nested):
    g = torch.Generator().manual_seed(4)
    img = torch.tanh(torch.randn(16, BITS, generator=g))
    txt = torch.tanh(torch.atanh(img.clamp(-0.99, 0.99)) + 0.3 * torch.randn(16, BITS, generator=g))

    def loss(t):
        if nested:
            return nested_loss(lambda x, y: instance_loss(x, y, None, 12.0, 0.1), img, t, [8, 16, BITS])[0]
        return instance_loss(img, t, None, 12.0, 0.1)[0]

    assert loss(txt) < loss(txt[NEXT]) - 0.05


def test_distillation_is_lower_with_the_teacher_of_these_pairs_than_with_a_shuffled_one():
    img, txt, _ = _class_codes(noise=1.0)
    g = torch.Generator().manual_seed(5)
    teacher_img = F.normalize(img + 0.1 * torch.randn(img.shape, generator=g), dim=1)  # a teacher that agrees
    teacher_txt = F.normalize(txt + 0.1 * torch.randn(txt.shape, generator=g), dim=1)
    aligned = distillation(img, txt, teacher_img, teacher_txt, 12.0, 20.0)
    shuffled = distillation(img, txt, teacher_img, teacher_txt[NEXT], 12.0, 20.0)
    assert aligned < shuffled - 0.05, (aligned, shuffled)


def test_binary_terms_are_lower_for_binary_and_balanced_codes():
    g = torch.Generator().manual_seed(6)
    signs = torch.where(torch.rand(64, BITS, generator=g) < 0.5, 1.0, -1.0)
    assert quantisation(0.95 * signs) < quantisation(0.2 * signs) - 0.05
    unbalanced = signs.abs()  # every bit +1 for every item
    assert bit_balance(0.9 * signs) < bit_balance(0.9 * unbalanced) - 0.05


# ---------------------------------------------------------------- gradients move codes towards their targets

def _step(codes: list[torch.Tensor], loss_fn, lr: float = 0.05) -> list[torch.Tensor]:
    """One gradient-descent step on the codes themselves."""
    leaves = [c.clone().requires_grad_(True) for c in codes]
    loss_fn(*leaves).backward()
    return [(leaf - lr * leaf.grad).detach() for leaf in leaves]


def test_dcmh_gradient_raises_similar_pairs_agreement_and_lowers_dissimilar():
    _, _, labels = _class_codes()
    g = torch.Generator().manual_seed(11)
    img, txt = 0.2 * torch.randn(16, BITS, generator=g), 0.2 * torch.randn(16, BITS, generator=g)  # no structure yet
    similar = (labels @ labels.T) > 0
    new_img, new_txt = _step([img, txt], lambda x, y: pairwise_likelihood(x, y, labels, 0.5))
    before, after = img @ txt.T, new_img @ new_txt.T
    assert (after - before)[similar].mean() > 0 and (after - before)[~similar].mean() < 0


def test_quantisation_gradient_pulls_codes_to_their_shared_sign_and_balance_evens_bits():
    g = torch.Generator().manual_seed(7)
    img, txt = torch.tanh(torch.randn(8, BITS, generator=g)), torch.tanh(torch.randn(8, BITS, generator=g))
    target = binary_target(img, txt)
    new_img, new_txt = _step([img, txt], lambda x, y: quantisation(x, target) + quantisation(y, target))
    assert (new_img - target).abs().sum() < (img - target).abs().sum()
    assert (new_txt - target).abs().sum() < (txt - target).abs().sum()
    skewed = 0.5 + 0.1 * torch.rand(8, BITS, generator=g)  # every bit mostly +1
    (new,) = _step([skewed], bit_balance, lr=1.0)
    assert new.mean(0).abs().mean() < skewed.mean(0).abs().mean()


@pytest.mark.parametrize("with_teacher", [False, True])
def test_instance_gradient_pulls_each_caption_code_towards_its_image_code(with_teacher):
    g = torch.Generator().manual_seed(8)
    img, txt = torch.tanh(torch.randn(12, BITS, generator=g)), torch.tanh(torch.randn(12, BITS, generator=g))
    teacher = (F.normalize(img, dim=1), F.normalize(img, dim=1)) if with_teacher else None  # pairs are the same
    new_img, new_txt = _step([img, txt], lambda x, y: instance_loss(x, y, None, 12.0, 0.1, teacher, 1.0, 20.0)[0])
    before, after = F.cosine_similarity(img, txt), F.cosine_similarity(new_img, new_txt)
    assert (after > before).float().mean() > 0.9, (after - before)


def test_a_prefix_loss_moves_only_the_prefix_and_towards_its_memory_keys():
    g = torch.Generator().manual_seed(9)
    bank = MemoryBankContrast(12, BITS, tau=0.9, momentum=0.4, num_negatives=8, seed=1)
    idx = torch.arange(6)
    h = torch.tanh(torch.randn(6, BITS, generator=g))
    leaf = h.clone().requires_grad_(True)
    loss, parts = nested_loss(lambda x, y: (bank.loss(x, idx, 0, False, y), {}), leaf, leaf, [8])
    loss.backward()
    assert torch.all(leaf.grad[:, 8:] == 0) and leaf.grad[:, :8].abs().sum() > 0  # only the first 8 bits
    keys = torch.sign(bank.bank[idx, :8])
    moved = h[:, :8] - 0.5 * leaf.grad[:, :8]
    assert (F.cosine_similarity(moved, keys) > F.cosine_similarity(h[:, :8], keys)).all()


def test_nested_loss_weights_every_length_and_names_its_parts():
    g = torch.Generator().manual_seed(10)
    hx, hy = torch.tanh(torch.randn(8, BITS, generator=g)), torch.tanh(torch.randn(8, BITS, generator=g))

    def loss_of(x, y):
        return instance_loss(x, y, None, 12.0, 0.1)

    total, parts = nested_loss(loss_of, hx, hy, [8, 16, BITS])
    each = [loss_of(hx[:, :n], hy[:, :n])[0] for n in (8, 16, BITS)]
    assert torch.allclose(total, sum(each) / 3)
    assert set(parts) == {f"{n}bit/{p}" for n in (8, 16, BITS) for p in ("loss", "contrast", "quantisation")}
    assert torch.allclose(parts["16bit/loss"], each[1])
    with pytest.raises(ValueError, match="code lengths"):
        nested_loss(loss_of, hx, hy, [8, 2 * BITS])


def test_straight_through_codes_are_the_signs_forward_and_pass_the_gradient_back():
    h = torch.tensor([[0.3, -0.2, 0.0, -0.9]], requires_grad=True)
    codes = straight_through(h)
    assert codes.tolist() == [[1.0, -1.0, 1.0, -1.0]]
    (codes * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    assert h.grad.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    g = torch.Generator().manual_seed(12)
    img, txt = torch.tanh(torch.randn(12, BITS, generator=g)), torch.tanh(torch.randn(12, BITS, generator=g))
    new_img, new_txt = _step([img, txt], lambda x, y: instance_loss(straight_through(x), straight_through(y), None,
                                                                     12.0, 0.1)[0], lr=0.5)
    agree = (torch.sign(img) == torch.sign(txt)).float().mean(1)  # binary agreement of each pair's codes
    assert (torch.sign(new_img) == torch.sign(new_txt)).float().mean(1).mean() > agree.mean()


# ---------------------------------------------------------------- UCCH: aligned below shuffled, warm-up included

def test_ucch_warmup_contrast_is_lower_for_aligned_than_for_shuffled_pairs():
    """The warm-up branch (in-batch keys from both modalities' mean codes, no memory yet)."""
    img, txt, _ = _class_codes(noise=0.3)
    bank = MemoryBankContrast(16, BITS, tau=0.9, momentum=0.4, num_negatives=8, seed=2)
    idx = torch.arange(16)

    def contrast(t):
        return bank.loss(img, idx, 0, True, t) + bank.loss(t, idx, 0, True, img)

    assert contrast(txt) < contrast(txt[NEXT]) - 0.05, (contrast(txt), contrast(txt[NEXT]))


@pytest.mark.parametrize("warmup", [True, False])
def test_ucch_code_loss_is_lower_for_aligned_than_for_shuffled_pairs(warmup):
    """UCCH's whole objective (contrast + ranking) in and after warm-up; after it, against a bank that has
    learnt the images' codes."""
    from pipeline.models.encoders import FeatureInput
    from pipeline.training.hasher_ucch import CrossModalHasher

    img, txt, _ = _class_codes(noise=0.3)
    model = CrossModalHasher(FeatureInput(D_IN), FeatureInput(D_IN), {}, BITS, 16, num_train_items=16,
                             num_negatives=8, warmup_epochs=1 if warmup else 0)
    model.bank.bank.copy_(F.normalize(img, dim=1))
    batch = {"image_ids": torch.arange(16)}
    aligned, shuffled = model.code_loss(img, txt, batch)[0], model.code_loss(img, txt[NEXT], batch)[0]
    assert aligned < shuffled - 0.05, (aligned, shuffled)
