"""NLP tasks for experiments: base-model loaders, data modules and LightningModules.

    from lightning_lora.tasks import load_model, SST2DataModule, SequenceClassifier
    model, tokenizer = load_model("minilm", task="classification", num_labels=2)
    dm = SST2DataModule(tokenizer, max_length=66, batch_size=32)
    module = SequenceClassifier(model, num_labels=2, metrics=dm.metrics, lr=5e-4)
"""

from .glue import (
    TASKS,
    CoLADataModule,
    Example,
    GLUEDataModule,
    MRPCDataModule,
    RTEDataModule,
    SST2DataModule,
    pad_batch,
    read_split,
    split_dev,
    unrepeated_eval_sampler,
)
from .lm import TinyShakespeareDataModule, WikiText2DataModule, make_blocks, tokenize_corpus
from .models import (
    MODELS,
    ModelPackageMissing,
    load_minilm,
    load_model,
    load_smollm2,
    load_tiny_bert,
    load_tiny_llama,
    minilm_path,
    smollm2_gguf,
)
from .modules import (CausalLM, ExampleMean, SequenceClassifier, classification_metrics, linear_warmup_decay,
                      method_optimizer)
from .paths import nlp_data_dir, repo_root, results_dir

#: data config name (conf/data/*.yaml ``name``) -> LightningDataModule class
DATAMODULES = {
    "sst2": SST2DataModule,
    "mrpc": MRPCDataModule,
    "rte": RTEDataModule,
    "cola": CoLADataModule,
    "shakespeare": TinyShakespeareDataModule,
    "wikitext2": WikiText2DataModule,
}

__all__ = [
    "CausalLM", "CoLADataModule", "DATAMODULES", "Example", "ExampleMean", "GLUEDataModule", "MODELS", "MRPCDataModule",
    "ModelPackageMissing", "RTEDataModule", "SST2DataModule", "SequenceClassifier", "TASKS",
    "TinyShakespeareDataModule", "WikiText2DataModule", "classification_metrics", "linear_warmup_decay",
    "load_minilm", "load_model", "load_smollm2", "load_tiny_bert", "load_tiny_llama", "make_blocks", "method_optimizer",
    "minilm_path", "nlp_data_dir", "pad_batch", "read_split", "repo_root", "results_dir", "smollm2_gguf",
    "split_dev", "tokenize_corpus", "unrepeated_eval_sampler",
]
