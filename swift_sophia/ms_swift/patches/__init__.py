"""Changes to ms-swift's own commands (`swift infer`, `swift deploy`, `swift sft`, `swift eval`)."""
