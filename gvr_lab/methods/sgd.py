"""Plain SGD: one forward and backward on the batch, then the base optimizer's step.

The base optimizer (momentum, Nesterov, weight decay) and the learning-rate schedule come from the
training Config, so this is also Novack et al.'s small-batch `Vanilla` when run with their
settings (momentum 0, weight decay 0, constant lr, batch 128).
"""

from .base import Method, register_method


@register_method
class SGD(Method):
    name = "sgd"
    aliases = ("vanilla",)
    reference = "Robbins & Monro 1951; the small-batch baseline (Vanilla) of Novack et al. 2023"
    color = "#3b3b3b"

    def step(self, batch):
        self.zero_grad()
        logits = self.forward(batch.x)
        loss = self.loss(logits, batch.y)
        loss.backward()
        # Logged so a later run can graft this run's step lengths (exter_graft reads it).
        grad_norm = self.update_norm()
        self.optimizer.step()
        # The batch is its own (only) micro-batch: same trajectory as the micro-batch methods log.
        return self.metrics(logits, batch.y, loss, grad_norm=grad_norm, micro_grad_norm=grad_norm)
