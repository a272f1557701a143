"""What callers submit, turned into prompt token ids: the engine's prompt processor.

It runs on the engine thread when a request is admitted (so a text request crosses only the event loop and the
engine thread), and is also called by the offline API for ``encode``/``render_chat``. A prompt is:

- a string: tokenized with the model's special tokens (BOS), no template;
- a list of chat messages: the model's chat template; image parts (OpenAI ``image_url``, rtp-mm's ``image``) become
  the vision model's placeholder text, in order, and must pair up with the request's images;
- a ``ChatPrompt``: messages plus the tools (OpenAI function definitions) the template shows the model;
- token ids: used as given (the engine takes those without calling the processor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rtp_mm.errors import EmptyPromptError, InvalidRequest, NotImplementedYetError
from rtp_mm.model_types import ModelTypeInfo
from rtp_mm.vision.base import VisionModel
from rtp_mm.vision.chat import has_image_parts, render_image_parts


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation and the tools to render with it. ``need_tool_template``: the request relies on the model
    seeing the tools (tool_choice auto), so a chat template without a tools section is an error, not a silent
    omission."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    need_tool_template: bool = False


class PromptProcessor:
    """Stateless over a tokenizer: safe to call from any thread that may use the tokenizer."""

    def __init__(self, tokenizer: Any, vision: VisionModel | None, model_type: ModelTypeInfo):
        self.tokenizer = tokenizer
        self.vision = vision
        self.model_type = model_type

    def __call__(self, prompt: Any, num_images: int = 0) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise EmptyPromptError("prompt is empty")
            return self.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            prompt = ChatPrompt(prompt)
        if isinstance(prompt, ChatPrompt):
            ids, num_parts = self.chat_prompt(prompt.messages, self._tools(prompt))
            if num_parts != num_images:
                raise InvalidRequest(f"{num_parts} image parts in the messages but {num_images} images were given")
            return ids
        raise InvalidRequest(
            f"prompt must be a string, a list of token ids or a list of chat messages, got {type(prompt).__name__}"
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: tokenizers raise a bare TypeError on it
            raise InvalidRequest(f"the prompt is not valid Unicode text (at character {e.start}: {e.reason})") from None
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("this model has no chat template; send a raw prompt instead")
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def supports_tools(self) -> bool:
        """The chat template has a tools section (a Jinja template that reads ``tools``)."""
        template = getattr(self.tokenizer, "chat_template", None)
        return isinstance(template, str) and "tools" in template

    def _tools(self, prompt: ChatPrompt) -> list[dict[str, Any]] | None:
        if not prompt.tools or self.supports_tools():
            return prompt.tools or None
        if prompt.need_tool_template:
            raise InvalidRequest(
                f"MODEL_TYPE={self.model_type.name}: the chat template has no tools section, so tool_choice 'auto' "
                "cannot show the model its tools; name a function in tool_choice (or 'required') instead"
            )
        return None  # a named / required tool_choice constrains the answer instead

    def chat_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        encode_chat = getattr(self.tokenizer, "encode_chat", None)
        if encode_chat is not None:  # rtp-mm's adapters build chat prompts at the id level, as the originals do
            return list(encode_chat(messages))
        return self.encode(self.render_chat(messages, tools=tools), add_special_tokens=False)

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> tuple[list[int], int]:
        """Prompt ids of one conversation and its number of image parts (rendered as the model's placeholders)."""
        if not has_image_parts(messages):
            return self.chat_ids(messages, tools), 0
        if self.vision is None:
            refuse_images(self.model_type)
        rendered, sources = render_image_parts(messages, self.vision.image_placeholder)
        return self.chat_ids(rendered, tools), len(sources)


def refuse_images(model_type: ModelTypeInfo) -> None:
    """The error for images sent to a model without a vision encoder."""
    if model_type.vision:
        raise NotImplementedYetError(f"MODEL_TYPE={model_type.name}: the vision encoder is not implemented yet")
    raise InvalidRequest(f"MODEL_TYPE={model_type.name} is a text-only model: images are not accepted")
