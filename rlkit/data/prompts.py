"""Question text -> prompt token ids, through the tokenizer's chat template when it has one."""
from __future__ import annotations

# Default template for math tasks: the `math` verifier reads the last \boxed{...} (else the last number).
# SmolLM2-135M-Instruct (Q4_1 GGUF, fp32), greedy, 32 arithmetic test-split items (seed 0), 96 new tokens:
# 5/32 correct with this template, 3/32 replies boxed; plain question 5/32; "Please reason step by step, and put
# your final answer within \boxed{}." 2/32; "Put your final answer within \boxed{}." 4/32.
BOXED_TEMPLATE = "{question}\nGive only the final answer, in the form \\boxed{}."


def format_question(question: str, template: str = "{question}") -> str:
    """`template` with its `{question}` placeholder replaced (other braces, e.g. `\\boxed{}`, stay literal)."""
    if "{question}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{question}}' placeholder (set data.template)")
    return template.replace("{question}", question)


def build_prompt(
    tokenizer,
    question: str,
    *,
    template: str = "{question}",
    system_prompt: str | None = None,
    use_chat_template: bool = True,
) -> list[int]:
    """Token ids of the prompt: the chat template with the generation prompt appended when the tokenizer
    has one and `use_chat_template`, else the raw text (system prompt, a blank line, then the question)."""
    text = format_question(question, template)
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        messages.append({"role": "user", "content": text})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The rendered template already carries any BOS/special tokens it wants.
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    if system_prompt is not None:
        text = f"{system_prompt}\n\n{text}"
    return list(tokenizer(text)["input_ids"])
