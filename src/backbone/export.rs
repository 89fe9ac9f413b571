//! Exporting a classifier so other runtimes can use it: `model.safetensors` (every variable,
//! named as in torchvision plus the head) and `model.json` (classes, base model, head,
//! preprocessing, evaluation clips); and TorchScript by tracing (`model.ts.pt`: input a
//! normalised `[N, 3, T, H, W]` float clip, output logits `[N, classes]`), loadable with
//! `torch.jit.load` or libtorch.
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::VarStore;

use super::{HeadSpec, Preprocessing, VideoClassifier};

/// What a consumer needs to use the exported weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportMetadata {
    pub format: String,
    /// Built-in architecture name, or the TorchScript backbone's name.
    pub base_model: String,
    pub classes: Vec<String>,
    pub head: HeadSpec,
    pub preprocessing: Preprocessing,
    /// Clips averaged per video at evaluation (and by default at serving).
    pub eval_clips: i64,
    pub vidtune_version: String,
    pub libtorch_version: String,
}

impl ExportMetadata {
    pub fn new(
        base_model: &str,
        classes: Vec<String>,
        head: HeadSpec,
        preprocessing: Preprocessing,
        eval_clips: i64,
    ) -> Self {
        Self {
            format: "vidtune-classifier-v1".into(),
            base_model: base_model.into(),
            classes,
            head,
            preprocessing,
            eval_clips,
            vidtune_version: env!("CARGO_PKG_VERSION").into(),
            libtorch_version: env!("VIDTUNE_LIBTORCH_VERSION").into(),
        }
    }
}

/// Write `model.safetensors` (every variable of the var store, BatchNorm statistics included)
/// and `model.json` into `dir`.
pub fn write_safetensors(vs: &VarStore, meta: &ExportMetadata, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let named: Vec<(&str, Tensor)> = vars
        .iter()
        .map(|(n, t)| (n.as_str(), t.to_device(tch::Device::Cpu)))
        .collect();
    Tensor::write_safetensors(&named, dir.join("model.safetensors"))
        .context("writing model.safetensors")?;
    std::fs::write(dir.join("model.json"), serde_json::to_vec_pretty(meta)?)
        .context("writing model.json")?;
    Ok(())
}

unsafe extern "C" {
    fn vidtune_trace_begin(
        module_name: *const c_char,
        params: *const *mut torch_sys::C_tensor,
        names: *const *const c_char,
        nparams: c_int,
        input: *mut torch_sys::C_tensor,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn vidtune_trace_end_and_save(
        module: *mut c_void,
        output: *mut torch_sys::C_tensor,
        path: *const c_char,
        err: *mut *mut c_char,
    ) -> c_int;
    fn vidtune_free_message(msg: *mut c_char);
}

fn take_message(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown libtorch error".into();
    }
    // SAFETY: the shim returns a malloc'd NUL-terminated string, freed here once.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { vidtune_free_message(err) };
    msg.lines().next().unwrap_or_default().to_owned()
}

/// Trace the classifier in eval mode on `example` (`[N, 3, T, H, W]`) and save TorchScript.
/// Every variable of `vs` becomes an attribute of the module.
pub fn write_torchscript(
    vs: &VarStore,
    model: &VideoClassifier,
    example: &Tensor,
    path: &Path,
) -> anyhow::Result<()> {
    // Tracing runs the model here; a tenant's module runs only in its sandbox.
    anyhow::ensure!(
        !model.is_sandboxed(),
        "a model on a TorchScript backbone cannot be traced outside the backbone's sandbox"
    );
    let _guard = tch::no_grad_guard();
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<CString> = vars
        .iter()
        .map(|(n, _)| CString::new(n.replace('.', "_")).expect("no NUL in names"))
        .collect();
    let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let mut params: Vec<Tensor> = vars.iter().map(|(_, t)| t.shallow_clone()).collect();
    let param_ptrs: Vec<*mut torch_sys::C_tensor> =
        params.iter_mut().map(|t| t.as_mut_ptr()).collect();
    let mut input = example.shallow_clone();
    let module_name = CString::new("VidtuneClassifier").expect("static name");
    let path_c = CString::new(path.to_string_lossy().as_bytes()).context("path contains NUL")?;
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: all pointers outlive the calls; the shim copies names and detaches tensors.
    let module = unsafe {
        vidtune_trace_begin(
            module_name.as_ptr(),
            param_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
            param_ptrs.len() as c_int,
            input.as_mut_ptr(),
            &mut err,
        )
    };
    if module.is_null() {
        anyhow::bail!("starting the trace: {}", take_message(err));
    }
    let mut output = model.forward_t(&input, false);
    // SAFETY: `module` came from vidtune_trace_begin and is consumed here.
    let rc = unsafe {
        vidtune_trace_end_and_save(module, output.as_mut_ptr(), path_c.as_ptr(), &mut err)
    };
    if rc != 0 {
        anyhow::bail!("saving TorchScript: {}", take_message(err));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::{Arch, Freeze};
    use tch::CModule;
    use tch::{Device, Kind};

    #[test]
    fn safetensors_export_reloads_to_the_same_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let head = HeadSpec::Mlp {
            hidden: vec![32],
            dropout: 0.5,
        };
        let vs = VarStore::new(Device::Cpu);
        let model = VideoClassifier::new(&vs.root(), Arch::R3d18, 3, &head, Freeze::Full).unwrap();
        let x = Tensor::randn([2, 3, 4, 32, 32], (Kind::Float, Device::Cpu));
        let expected = tch::no_grad(|| model.forward_t(&x, false));

        let meta = ExportMetadata::new(
            "r3d_18",
            vec!["a".into(), "b".into(), "c".into()],
            head.clone(),
            Arch::R3d18.preprocessing(),
            5,
        );
        write_safetensors(&vs, &meta, dir.path()).unwrap();
        let back: ExportMetadata =
            serde_json::from_slice(&std::fs::read(dir.path().join("model.json")).unwrap()).unwrap();
        assert_eq!(back, meta);
        let mut vs2 = VarStore::new(Device::Cpu);
        let model2 =
            VideoClassifier::new(&vs2.root(), Arch::R3d18, 3, &head, Freeze::Full).unwrap();
        vs2.load(dir.path().join("model.safetensors")).unwrap();
        let got = tch::no_grad(|| model2.forward_t(&x, false));
        assert!(got.allclose(&expected, 1e-6, 1e-6, false));

        let ts = dir.path().join("model.ts.pt");
        write_torchscript(&vs, &model, &x, &ts).unwrap();
        let loaded = CModule::load(&ts).unwrap();
        let got = tch::no_grad(|| loaded.forward_ts(&[&x])).unwrap();
        let diff = (&got - &expected).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "TorchScript export differs by {diff}");
        // Another batch size works too.
        let y = Tensor::randn([1, 3, 4, 32, 32], (Kind::Float, Device::Cpu));
        let a = tch::no_grad(|| loaded.forward_ts(&[&y])).unwrap();
        let b = tch::no_grad(|| model.forward_t(&y, false));
        assert!((a - b).abs().max().double_value(&[]) < 1e-5);
    }
}
