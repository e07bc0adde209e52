"""Chat for DeepSeek-V4: the prompt encoding (thinking / non-thinking, tools in DSML), the
reasoning parser and the streaming tool-call parser. No server or engine imports: `serve/`,
`engine/` and `generate/` build on these."""

from atom_jax.chat.encoding import EncodingError, encode_messages
from atom_jax.chat.plan import ChatDelta, ChatParser, ChatPlan, ChatSettings, plan_chat

__all__ = ["ChatDelta", "ChatParser", "ChatPlan", "ChatSettings", "EncodingError",
           "encode_messages", "plan_chat"]
