//! LoRA adapters in PEFT's layout, so `PeftModel.from_pretrained(base, dir)` loads them:
//! `adapter_config.json` and `adapter_model.safetensors` with tensors named
//! `base_model.model.<module>.lora_A.weight` `(r, in)` and `….lora_B.weight` `(out, r)` (PEFT
//! holds both as `nn.Linear`s). GPT-2's Conv1D layers store `(in, out)`, hence
//! `fan_in_fan_out: true`.

use std::collections::HashMap;
use std::path::Path;

use super::io::{self, Named};
use super::{LoraConfig, LoraTarget};

const PREFIX: &str = "base_model.model.";

/// The adapter tensors among a model's `weights()` (named `<module>.lora_A` / `.lora_B`,
/// `(in, r)` / `(r, out)`), renamed and transposed for PEFT.
pub fn adapter_tensors(weights: &Named) -> Named {
    weights
        .iter()
        .filter_map(|(name, shape, data)| {
            let (module, which) = name
                .strip_suffix(".lora_A")
                .map(|m| (m, "lora_A"))
                .or_else(|| name.strip_suffix(".lora_B").map(|m| (m, "lora_B")))?;
            Some((
                format!("{PREFIX}{module}.{which}.weight"),
                vec![shape[1], shape[0]],
                io::transpose(data, shape[0], shape[1]),
            ))
        })
        .collect()
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
pub fn write_adapter(
    dir: &Path,
    config: &LoraConfig,
    weights: &Named,
    base_model: &str,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let targets: Vec<&str> = config.targets.iter().map(|t| t.name()).collect();
    // GPT-2's Conv1D holds its weights `(in, out)`; the Llama family's nn.Linear `(out, in)`.
    let conv1d = config.targets.iter().any(|t| LoraTarget::GPT.contains(t));
    let json = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
    });
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec_pretty(&json).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", dir.display()))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    io::write_safetensors(
        &dir.join("adapter_model.safetensors"),
        &adapter_tensors(weights),
        Some(metadata),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapters_are_renamed_and_transposed() {
        let weights: Named = vec![
            ("transformer.wte.weight".into(), vec![2, 2], vec![0.0; 4]),
            (
                "transformer.h.0.attn.c_attn.lora_A".into(),
                vec![3, 2],
                vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            ),
            (
                "transformer.h.0.attn.c_attn.lora_B".into(),
                vec![2, 1],
                vec![7.0, 8.0],
            ),
        ];
        let adapter = adapter_tensors(&weights);
        assert_eq!(
            adapter,
            vec![
                (
                    "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight".to_string(),
                    vec![2, 3],
                    vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]
                ),
                (
                    "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight".to_string(),
                    vec![1, 2],
                    vec![7.0, 8.0]
                ),
            ]
        );
    }
}
