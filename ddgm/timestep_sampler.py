"""Samplers of the training timestep t, with weights that keep ELBO estimates unbiased.

A sampler draws t ~ p(t) on {1..T} and returns w(t) = 1 / (T p(t)), so that
E_p[T w(t) L_{t-1}] = sum_t L_{t-1} for any p with full support.
"""

from __future__ import annotations

import numpy as np
import torch

TIMESTEP_SAMPLERS = ("uniform", "importance")


class UniformSampler:
    """p(t) = 1/T; every weight is 1."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps

    def probabilities(self) -> np.ndarray:
        return np.full(self.num_steps, 1.0 / self.num_steps)

    def sample(self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] (1-indexed, long) and weights 1 / (T p(t)) [B] (float32). t is drawn on the generator's
        device (a CUDA generator cannot draw from a CPU tensor)."""
        draw_on = generator.device if generator is not None else "cpu"
        probs = torch.as_tensor(self.probabilities(), dtype=torch.float64, device=draw_on)
        index = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_steps * probs[index])
        return (index + 1).to(device), weights.float().to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example losses L_{t-1} observed at timesteps t (nothing to learn here)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        pass


class ImportanceSampler(UniformSampler):
    """p(t) proportional to sqrt(E[L_{t-1}^2]) over the last ``history`` losses seen at each t
    (Nichol & Dhariwal 2021), mixed with ``uniform_mix`` of the uniform distribution; uniform
    until every t has a full history."""

    def __init__(self, num_steps: int, history: int = 10, uniform_mix: float = 0.001):
        super().__init__(num_steps)
        if not 0.0 < uniform_mix <= 1.0:
            raise ValueError(f"uniform_mix must lie in (0, 1], got {uniform_mix!r}")
        self.uniform_mix = uniform_mix
        self.losses = np.zeros((num_steps, history), dtype=np.float64)
        self.counts = np.zeros(num_steps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.counts >= self.losses.shape[1]).all())

    def probabilities(self) -> np.ndarray:
        if not self.warmed_up():
            return super().probabilities()
        rms = np.sqrt((self.losses**2).mean(axis=1))
        probs = rms / rms.sum()
        return (1.0 - self.uniform_mix) * probs + self.uniform_mix / self.num_steps

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        history = self.losses.shape[1]
        for step, loss in zip(t.tolist(), losses.detach().double().tolist(), strict=True):
            row = step - 1
            if self.counts[row] >= history:
                self.losses[row, :-1] = self.losses[row, 1:]
                self.losses[row, -1] = loss
            else:
                self.losses[row, self.counts[row]] = loss
            self.counts[row] += 1

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"losses": self.losses.copy(), "counts": self.counts.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.losses = np.asarray(state["losses"], dtype=np.float64).copy()
        self.counts = np.asarray(state["counts"], dtype=np.int64).copy()


def make_timestep_sampler(name: str, num_steps: int, uniform_mix: float = 0.001) -> UniformSampler:
    """The sampler named ``name`` ('uniform' or 'importance', with ``uniform_mix`` of the uniform p(t))."""
    if name == "uniform":
        return UniformSampler(num_steps)
    if name == "importance":
        return ImportanceSampler(num_steps, uniform_mix=uniform_mix)
    raise ValueError(f"timestep_sampler must be one of {TIMESTEP_SAMPLERS}, got {name!r}")
