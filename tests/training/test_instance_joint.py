"""Instance-level codes taught by an embedding trained beside them (hash.instance.joint_weight): the embedding
learns from its own InfoNCE only (the codes' distillation does not move their teacher), the codes learn from
the embedding's similarities, and the embedding stays out of what retrieval and exports use."""
import torch

from pipeline.config import load_config
from pipeline.objectives.contrastive import info_nce
from pipeline.objectives.instance import instance_loss
from pipeline.training.build import build_module
from tests.training.test_grad_cache import TINY, VOCAB, make_batch

JOINT = 0.5


def _module(joint_weight: float):
    overrides = [t for t in TINY if not t.startswith("optim.accum_steps")]
    cfg = load_config("hash_instance_64bit.yaml", [*overrides, f"hash.instance.joint_weight={joint_weight}"])
    torch.manual_seed(0)
    return build_module(cfg, num_train_items=64, vocab_size=VOCAB, pad_token_id=0, load_init=False).double().train()


def test_the_embedding_learns_from_its_infonce_alone_and_teaches_the_codes():
    module, batch = _module(JOINT), make_batch(8)
    hx, hy, ex, ey = module.represent(batch)
    loss, parts = module.training_loss([hx, hy, ex, ey], batch)
    assert {"distillation", "embedding"} <= parts.keys()
    heads = [*module.image_embedding.parameters(), *module.text_embedding.parameters()]
    scale = module.embedding_logit_scale.clamp(max=module.max_log_scale).exp()
    joint_only = JOINT * info_nce(ex, ey, scale, batch["image_ids"])
    for got, want in zip(torch.autograd.grad(loss, heads, retain_graph=True),
                         torch.autograd.grad(joint_only, heads, retain_graph=True)):
        torch.testing.assert_close(got, want)  # fails if the distillation's gradient reached its teacher
    # the codes' loss is the instance objective with the embedding's (detached) vectors as the teacher
    code_loss, _ = instance_loss(hx, hy, batch["image_ids"], module.scale, module.quant_weight, (ex, ey),
                                 module.distill_weight, module.teacher_scale)
    torch.testing.assert_close(loss, code_loss + joint_only)


def test_the_embedding_is_training_only_state():
    module = _module(JOINT)
    kept = module.inference_state_dict().keys()
    assert not any(k.startswith(("image_embedding", "text_embedding", "embedding_logit")) for k in kept)
    plain = _module(0.0)  # a model without the embedding loads the joint model's inference weights
    plain.load_inference_state(module.state_dict())
    assert not hasattr(plain, "image_embedding")
