/* adapter.h: PEFT LoRA adapter directories, written and read.
 *
 * A directory that peft's PeftModel.from_pretrained loads onto the
 * transformers model (qlora-formats(5), "PEFT adapters"):
 *   adapter_config.json        LoraConfig as PEFT writes it (sorted keys,
 *                              indent 2): peft_type "LORA", task_type
 *                              "CAUSAL_LM", r, lora_alpha, lora_dropout,
 *                              target_modules, use_rslora, bias "none", ...
 *   adapter_model.safetensors  F32 tensors, metadata {"format": "pt"}:
 *     base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight
 *         [r, in]
 *     base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_B.weight
 *         [out, r]
 */
#ifndef ADAPTER_H
#define ADAPTER_H

#include "llama.h"
#include "lora.h"

/* Writes a's two files into dir (created when missing; other files in it
 * are left alone), each through a temporary name and a rename.
 * base_model is recorded as base_model_name_or_path (may be NULL).
 * 0 ok, -1 error (message). */
int adapter_write(const char *dir, const lora_adapter *a,
                  const char *base_model);

/* Reads an adapter directory for a model of configuration mc: the config
 * (r, lora_alpha, lora_dropout, use_rslora; rank_pattern, alpha_pattern,
 * layers_to_transform, DoRA and biases are refused), then every tensor,
 * any float dtype, shapes checked. The targets are the linears that have
 * tensors; every layer must have all of them. *base_model (if non-NULL)
 * receives base_model_name_or_path, malloc'ed, or NULL. 0 ok, -1 error. */
int adapter_read(const char *dir, const llama_config *mc, lora_adapter **out,
                 char **base_model);

/* The tensor name of A (ab = 0) or B (ab = 1) of linear l in layer i. */
void adapter_tensor_name(char *buf, size_t size, int32_t layer, llama_linear l,
                         int ab);

#endif
