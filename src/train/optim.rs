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

    /// Drop every gradient, as `zero_grad(set_to_none=True)`: the next backward writes fresh
    /// ones rather than adding to zeroed ones (one pass over the gradients instead of three).
    pub fn zero_grad(&mut self) {
        let params: Vec<Tensor> = self
            .groups
            .iter()
            .flat_map(|g| g.params.iter().map(Tensor::shallow_clone))
            .collect();
        fused::clear_grads(&params);
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

    /// One update with learning rate `lr` (times each group's multiplier). Parameters without a
    /// gradient are skipped. Contiguous parameters go through libtorch's fused kernels, one pass
    /// over each parameter's tensors, as `torch.optim.*(fused=True)`; others step elementwise.
    pub fn step(&mut self, lr: f64) -> anyhow::Result<()> {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let mut idx = 0;
        for gi in 0..self.groups.len() {
            let group_lr = lr * self.groups[gi].lr_mult;
            let first = idx;
            idx += self.groups[gi].params.len();
            if group_lr == 0.0 {
                continue;
            }
            let params: Vec<Tensor> = self.groups[gi]
                .params
                .iter()
                .map(Tensor::shallow_clone)
                .collect();
            let mut fused = Vec::new();
            for (j, mut p) in params.into_iter().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let contiguous = p.is_contiguous()
                    && g.is_contiguous()
                    && [&self.state[first + j].0, &self.state[first + j].1]
                        .iter()
                        .all(|s| s.as_ref().is_none_or(Tensor::is_contiguous));
                if contiguous {
                    fused.push((first + j, p, g));
                } else {
                    self.step_one(first + j, &mut p, &g, group_lr);
                }
            }
            if !fused.is_empty() {
                self.step_fused(fused, group_lr)?;
            }
        }
        Ok(())
    }

    /// The fused kernels over `(state index, parameter, gradient)` of one group.
    fn step_fused(&mut self, params: Vec<(usize, Tensor, Tensor)>, lr: f64) -> anyhow::Result<()> {
        match self.kind {
            OptimizerKind::Sgd if self.momentum == 0.0 => {
                let (p, g): (Vec<_>, Vec<_>) = params.into_iter().map(|(_, p, g)| (p, g)).unzip();
                fused::sgd(&p, &g, None, lr, 0.0, self.weight_decay, false)
            }
            OptimizerKind::Sgd => {
                // Buffers made on this step start as the gradient (the kernel's first step).
                let (fresh, seen): (Vec<_>, Vec<_>) = params
                    .into_iter()
                    .partition(|(i, _, _)| self.state[*i].0.is_none());
                for (batch, first_step) in [(fresh, true), (seen, false)] {
                    if batch.is_empty() {
                        continue;
                    }
                    let mut p = Vec::with_capacity(batch.len());
                    let mut g = Vec::with_capacity(batch.len());
                    let mut b = Vec::with_capacity(batch.len());
                    for (i, param, grad) in batch {
                        let buf = self.state[i].0.get_or_insert_with(|| grad.empty_like());
                        b.push(buf.shallow_clone());
                        p.push(param);
                        g.push(grad);
                    }
                    fused::sgd(
                        &p,
                        &g,
                        Some(&b),
                        lr,
                        self.momentum,
                        self.weight_decay,
                        first_step,
                    )?;
                }
                Ok(())
            }
            OptimizerKind::Adam | OptimizerKind::Adamw => {
                let device = params[0].1.device();
                let step = Tensor::full([1], self.step as f64, (Kind::Float, device));
                let mut p = Vec::with_capacity(params.len());
                let mut g = Vec::with_capacity(params.len());
                let mut m = Vec::with_capacity(params.len());
                let mut v = Vec::with_capacity(params.len());
                for (i, param, grad) in params {
                    let (m1, m2) = &mut self.state[i];
                    m.push(m1.get_or_insert_with(|| grad.zeros_like()).shallow_clone());
                    v.push(m2.get_or_insert_with(|| grad.zeros_like()).shallow_clone());
                    p.push(param);
                    g.push(grad);
                }
                fused::adam(
                    &p,
                    &g,
                    &m,
                    &v,
                    &step,
                    lr,
                    (BETA1, BETA2, EPS),
                    self.weight_decay,
                    self.kind == OptimizerKind::Adamw,
                )
            }
        }
    }

    /// The elementwise update of parameter `i` (state index), for layouts the fused kernels
    /// do not take.
    fn step_one(&mut self, i: usize, p: &mut Tensor, g: &Tensor, lr: f64) {
        let t = self.step as f64;
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

/// libtorch's fused optimizer kernels, through the shim (`src/shim/shim.cpp`).
mod fused {
    use std::ffi::{CStr, c_char, c_double, c_int};

    use tch::Tensor;
    use torch_sys::C_tensor;

    unsafe extern "C" {
        fn vidtune_fused_sgd(
            params: *const *mut C_tensor,
            grads: *const *mut C_tensor,
            bufs: *const *mut C_tensor,
            n: c_int,
            lr: c_double,
            momentum: c_double,
            weight_decay: c_double,
            first_step: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        fn vidtune_fused_adam(
            params: *const *mut C_tensor,
            grads: *const *mut C_tensor,
            exp_avgs: *const *mut C_tensor,
            exp_avg_sqs: *const *mut C_tensor,
            step: *mut C_tensor,
            n: c_int,
            lr: c_double,
            beta1: c_double,
            beta2: c_double,
            eps: c_double,
            weight_decay: c_double,
            decoupled: c_int,
            err: *mut *mut c_char,
        ) -> c_int;
        fn vidtune_clear_grads(ts: *const *mut C_tensor, n: c_int);
        fn vidtune_free_message(msg: *mut c_char);
    }

    pub fn clear_grads(ts: &[Tensor]) {
        let p = ptrs(ts);
        // SAFETY: live tensor handles; resetting a gradient cannot throw.
        unsafe { vidtune_clear_grads(p.as_ptr(), p.len() as c_int) };
    }

    fn ptrs(ts: &[Tensor]) -> Vec<*mut C_tensor> {
        // The kernels update the tensors in place through these handles; `ts` outlives the call.
        ts.iter().map(|t| t.as_ptr() as *mut C_tensor).collect()
    }

    fn check(rc: c_int, err: *mut c_char, what: &str) -> anyhow::Result<()> {
        if rc == 0 {
            return Ok(());
        }
        let msg = if err.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: the shim returns a NUL-terminated malloc'd copy, freed here once.
            let m = unsafe { CStr::from_ptr(err) }
                .to_string_lossy()
                .into_owned();
            unsafe { vidtune_free_message(err) };
            m
        };
        anyhow::bail!("{what}: {msg}")
    }

    pub fn sgd(
        params: &[Tensor],
        grads: &[Tensor],
        bufs: Option<&[Tensor]>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        first_step: bool,
    ) -> anyhow::Result<()> {
        let (p, g) = (ptrs(params), ptrs(grads));
        let b = bufs.map(ptrs);
        let mut err = std::ptr::null_mut();
        // SAFETY: equal-length arrays of live tensor handles; the shim catches libtorch errors.
        let rc = unsafe {
            vidtune_fused_sgd(
                p.as_ptr(),
                g.as_ptr(),
                b.as_ref().map_or(std::ptr::null(), |b| b.as_ptr()),
                p.len() as c_int,
                lr,
                momentum,
                weight_decay,
                c_int::from(first_step),
                &mut err,
            )
        };
        check(rc, err, "fused SGD step")
    }

    #[expect(clippy::too_many_arguments, reason = "the kernel's own argument list")]
    pub fn adam(
        params: &[Tensor],
        grads: &[Tensor],
        exp_avgs: &[Tensor],
        exp_avg_sqs: &[Tensor],
        step: &Tensor,
        lr: f64,
        (beta1, beta2, eps): (f64, f64, f64),
        weight_decay: f64,
        decoupled: bool,
    ) -> anyhow::Result<()> {
        let (p, g, m, v) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs));
        let mut err = std::ptr::null_mut();
        // SAFETY: as in `sgd`.
        let rc = unsafe {
            vidtune_fused_adam(
                p.as_ptr(),
                g.as_ptr(),
                m.as_ptr(),
                v.as_ptr(),
                step.as_ptr() as *mut C_tensor,
                p.len() as c_int,
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                c_int::from(decoupled),
                &mut err,
            )
        };
        check(rc, err, "fused Adam step")
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
            opt.step(0.1).unwrap();
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

    #[test]
    fn l2_weight_decay_matches_pytorch() {
        // torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.01) and
        // torch.optim.Adam(lr=0.1, weight_decay=0.01) on sum(p²) from [1, -2], three steps.
        for (kind, want) in [
            (
                OptimizerKind::Sgd,
                [0.05819422006607056, -0.11638844013214111],
            ),
            (
                OptimizerKind::Adam,
                [0.7015862464904785, -1.7006233930587769],
            ),
        ] {
            let got = quadratic_steps(kind, 0.01);
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-5, "{kind:?}: {got:?}");
            }
        }
    }

    /// Three steps on conv-shaped parameters with two learning-rate groups, the second of
    /// which has no gradient on the first step; `transposed` stores every parameter
    /// non-contiguously, which takes the elementwise path instead of the fused kernels.
    fn three_steps(kind: OptimizerKind, momentum: f64, transposed: bool) -> Vec<Vec<f32>> {
        tch::manual_seed(3);
        let shapes: [&[i64]; 3] = [&[8, 3, 3, 3], &[8], &[5, 8]];
        let values: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)))
            .collect();
        let params: Vec<Tensor> = values
            .iter()
            .map(|v| {
                let t = if transposed && v.dim() > 1 {
                    v.transpose(0, 1).contiguous().transpose(0, 1)
                } else {
                    v.copy()
                };
                assert_eq!(t.is_contiguous(), !(transposed && v.dim() > 1));
                t.set_requires_grad(true)
            })
            .collect();
        let mut opt = Optimizer::new(
            kind,
            vec![
                Group {
                    params: params[..2].iter().map(Tensor::shallow_clone).collect(),
                    lr_mult: 0.1,
                },
                Group {
                    params: vec![params[2].shallow_clone()],
                    lr_mult: 1.0,
                },
            ],
            momentum,
            0.01,
        );
        let x = Tensor::randn([4, 3, 3, 3], (Kind::Float, Device::Cpu));
        for step in 0..3 {
            opt.zero_grad();
            let h = x
                .conv2d(&params[0], Some(&params[1]), [1, 1], [0, 0], [1, 1], 1)
                .flatten(1, -1);
            let loss = if step == 0 {
                h.pow_tensor_scalar(2).mean(Kind::Float)
            } else {
                h.matmul(&params[2].tr()).tanh().sum(Kind::Float)
            };
            loss.backward();
            opt.step(0.05).unwrap();
        }
        params
            .iter()
            .map(|p| Vec::<f32>::try_from(p.detach().contiguous().flatten(0, -1)).unwrap())
            .collect()
    }

    #[test]
    fn fused_kernels_match_the_elementwise_update() {
        for (kind, momentum) in [
            (OptimizerKind::Sgd, 0.9),
            (OptimizerKind::Sgd, 0.0),
            (OptimizerKind::Adam, 0.0),
            (OptimizerKind::Adamw, 0.0),
        ] {
            let fused = three_steps(kind, momentum, false);
            let elementwise = three_steps(kind, momentum, true);
            for (a, b) in fused.iter().flatten().zip(elementwise.iter().flatten()) {
                assert!(
                    (a - b).abs() < 1e-5,
                    "{kind:?} momentum {momentum}: {a} vs {b}"
                );
            }
            let start = {
                tch::manual_seed(3);
                Vec::<f32>::try_from(
                    Tensor::randn([8, 3, 3, 3], (Kind::Float, Device::Cpu)).flatten(0, -1),
                )
                .unwrap()
            };
            assert_ne!(fused[0], start, "{kind:?}: the parameters moved");
        }
    }
}
