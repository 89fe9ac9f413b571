//! Optimizers whose state we own, so a checkpoint holds everything needed for an exact resume
//! (tch's built-in optimizers cannot save theirs). Semantics follow PyTorch's `SGD` (momentum,
//! L2 weight decay), `Adam` (L2) and `AdamW` (decoupled decay).
use tch::{Kind, Tensor};

use super::hyper::OptimizerKind;

/// A set of parameters sharing a learning-rate multiplier (backbone vs head).
pub struct Group {
    pub params: Vec<Tensor>,
    pub lr_mult: f64,
}

pub struct Optimizer {
    kind: OptimizerKind,
    groups: Vec<Group>,
    /// First moment / momentum buffer and second moment, per parameter (groups flattened).
    state: Vec<(Option<Tensor>, Option<Tensor>)>,
    pub step: i64,
    momentum: f64,
    weight_decay: f64,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

impl Optimizer {
    pub fn new(kind: OptimizerKind, groups: Vec<Group>, momentum: f64, weight_decay: f64) -> Self {
        let n = groups.iter().map(|g| g.params.len()).sum();
        Self {
            kind,
            groups,
            state: (0..n).map(|_| (None, None)).collect(),
            step: 0,
            momentum,
            weight_decay,
        }
    }

    pub fn zero_grad(&mut self) {
        for g in &mut self.groups {
            for p in &mut g.params {
                p.zero_grad();
            }
        }
    }

    /// Scale gradients so their global L2 norm is at most `max_norm`; returns the norm before.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = self
            .groups
            .iter()
            .flat_map(|g| g.params.iter())
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let total = grads
            .iter()
            .map(|g| g.to_kind(Kind::Float).pow_tensor_scalar(2).sum(Kind::Float))
            .fold(Tensor::from(0f32), |a, b| a + b.to_device(tch::Device::Cpu))
            .sqrt()
            .double_value(&[]);
        if total > max_norm {
            let scale = max_norm / (total + 1e-6);
            for mut g in grads {
                let _ = g.g_mul_scalar_(scale);
            }
        }
        total
    }

    /// One update with learning rate `lr` (× each group's multiplier).
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let t = self.step as f64;
        let mut idx = 0;
        for group in &mut self.groups {
            let lr = lr * group.lr_mult;
            for p in &mut group.params {
                let i = idx;
                idx += 1;
                let g = p.grad();
                if !g.defined() || lr == 0.0 {
                    continue;
                }
                let (m, v) = &mut self.state[i];
                match self.kind {
                    OptimizerKind::Sgd => {
                        let mut g = g.shallow_clone();
                        if self.weight_decay != 0.0 {
                            g = &g + &*p * self.weight_decay;
                        }
                        if self.momentum != 0.0 {
                            let buf = match m.take() {
                                None => g.copy(),
                                Some(mut b) => {
                                    let _ = b.g_mul_scalar_(self.momentum).g_add_(&g);
                                    b
                                }
                            };
                            g = buf.shallow_clone();
                            *m = Some(buf);
                        }
                        let _ = p.g_sub_(&(g * lr));
                    }
                    OptimizerKind::Adam | OptimizerKind::Adamw => {
                        let mut g = g.shallow_clone();
                        if self.kind == OptimizerKind::Adamw {
                            let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                        } else if self.weight_decay != 0.0 {
                            g = &g + &*p * self.weight_decay;
                        }
                        let m1 = m.get_or_insert_with(|| g.zeros_like());
                        let _ = m1.g_mul_scalar_(BETA1).g_add_(&(&g * (1.0 - BETA1)));
                        let m2 = v.get_or_insert_with(|| g.zeros_like());
                        let _ = m2.g_mul_scalar_(BETA2).g_add_(&(&g * &g * (1.0 - BETA2)));
                        let bc1 = 1.0 - BETA1.powf(t);
                        let bc2 = 1.0 - BETA2.powf(t);
                        let denom = (&*m2 / bc2).sqrt() + EPS;
                        let _ = p.g_sub_(&(&*m1 / &denom * (lr / bc1)));
                    }
                }
            }
        }
    }

    /// Buffers as named tensors (`opt.<i>.m`, `opt.<i>.v`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (m, v)) in self.state.iter().enumerate() {
            if let Some(m) = m {
                out.push((format!("opt.{i}.m"), m.to_device(tch::Device::Cpu)));
            }
            if let Some(v) = v {
                out.push((format!("opt.{i}.v"), v.to_device(tch::Device::Cpu)));
            }
        }
        out
    }

    /// Restore buffers saved by [`Self::state_tensors`] (same parameter order).
    pub fn load_state(&mut self, step: i64, named: &[(String, Tensor)]) {
        let device = self
            .groups
            .iter()
            .flat_map(|g| g.params.first())
            .next()
            .map(Tensor::device)
            .unwrap_or(tch::Device::Cpu);
        self.step = step;
        for (name, t) in named {
            let mut parts = name.split('.');
            if let (Some("opt"), Some(i), Some(which)) = (parts.next(), parts.next(), parts.next())
                && let Ok(i) = i.parse::<usize>()
                && i < self.state.len()
            {
                let t = t.to_device(device);
                match which {
                    "m" => self.state[i].0 = Some(t),
                    "v" => self.state[i].1 = Some(t),
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn quadratic_steps(kind: OptimizerKind, wd: f64) -> Vec<f64> {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut opt = Optimizer::new(
            kind,
            vec![Group {
                params: vec![p.shallow_clone()],
                lr_mult: 1.0,
            }],
            0.9,
            wd,
        );
        for _ in 0..3 {
            opt.zero_grad();
            let loss = (&p * &p).sum(Kind::Float);
            loss.backward();
            opt.step(0.1);
        }
        Vec::<f64>::try_from(p.to_kind(Kind::Double).to_device(Device::Cpu)).unwrap()
    }

    #[test]
    fn sgd_momentum_matches_pytorch() {
        // torch.optim.SGD([p], lr=0.1, momentum=0.9) on sum(p²) from [1, -2], three steps.
        let got = quadratic_steps(OptimizerKind::Sgd, 0.0);
        let want = [0.06199999898672104, -0.12399999797344208];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn adamw_matches_pytorch() {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.01) on sum(p²) from [1, -2], three steps.
        let got = quadratic_steps(OptimizerKind::Adamw, 0.01);
        let want = [0.6989112496376038, -1.6949446201324463];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
    }
}
