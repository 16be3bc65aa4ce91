"""
The optional answer matcher of MMBench's circular evaluation. VLMEvalKit reads a letter with can_infer
(eval/mc_letters.py); a row it cannot read, in a group with no wrong row, goes to a chat model (ChatGPT,
gpt-3.5-turbo-0613, there) that is shown the question, the row's options and the answer and replies with a letter
or Z; its reply is read with can_infer again, up to 3 tries. Without a matcher such a row counts wrong (VLMEvalKit's
exact-matching mode, our default).

The matcher's prompt is VLMEvalKit's, which this project does not copy: --matcher-prompt is your copy of the
template string of build_prompt (vlmeval/evaluate/multiple_choice.py; three {} slots: question, options, answer)
with the heading line that build_option_str puts before the options moved into the file, just before the second
{} slot; the options then fill it as "A. text\n" lines, so the request's text is the official one. Differences
that remain (eval/README.md): after 3 unreadable replies VLMEvalKit draws a random letter (seeded, in a process
pool); here the row counts wrong; the request's other fields are ours (temperature 0).
"""
import os

from eval import judge_client
from eval.mc_letters import LETTERS, mmbench_letter

MATCHER_MODEL = "gpt-3.5-turbo-0613"  # VLMEvalKit's chatgpt-0613
MATCHER_TRIES = 3


def options_block(options):
    """The options as the matcher sees them: one "A. text" line each (build_option_str's lines, its heading in
    the user's template)."""
    return "".join(f"{letter}. {option}\n" for letter, option in zip(LETTERS, options))


class Matcher:
    """matcher(question, answer_row) -> the letter (of the row's shown options), 'Z', or None after MATCHER_TRIES
    unreadable replies; `name` goes into the results."""

    def __init__(self, client, template):
        self.client, self.template = client, template
        self.name = f"judge {client['model']} (VLMEvalKit's matcher prompt from --matcher-prompt)"

    def __call__(self, question, answer_row):
        text = self.template.format(question["question"], options_block(answer_row["options"]), answer_row["text"])
        messages = [{"role": "user", "content": text}]
        for attempt in range(MATCHER_TRIES):
            reply = judge_client.chat_completion(messages=messages, attempt=attempt, temperature=0.0,
                                                 max_tokens=16, **self.client)
            letter = mmbench_letter(reply, answer_row["options"])
            if letter:
                return letter
        return None


def add_matcher_args(parser):
    g = parser.add_argument_group("MMBench's optional matcher (default: exact matching)")
    g.add_argument("--matcher-url", default=None,
                   help="OpenAI-compatible base URL of a chat model that reads the letter of answers can_infer cannot "
                        "read (VLMEvalKit's ChatGPT matcher); none (default): such answers count wrong, VLMEvalKit's "
                        "exact matching; the key is read from OPENAI_API_KEY")
    g.add_argument("--matcher-model", default=MATCHER_MODEL, help=f"the matcher's model (default {MATCHER_MODEL}, VLMEvalKit's chatgpt-0613)")
    g.add_argument("--matcher-prompt", default=None, metavar="FILE",
                   help="your copy of VLMEvalKit's build_prompt template (three {} slots), with build_option_str's "
                        "heading line moved in just before the second slot; required with --matcher-url")
    g.add_argument("--matcher-cache", default="runs/eval/judge-cache", help="folder of cached matcher replies (default runs/eval/judge-cache)")
    return g


def matcher_from_args(args):
    """The Matcher of the flags, or None (exact matching)."""
    if not args.matcher_url:
        return None
    if not args.matcher_prompt:
        raise ValueError("--matcher-url needs --matcher-prompt (your copy of VLMEvalKit's matcher template)")
    client = dict(url=args.matcher_url, model=args.matcher_model, cache_dir=args.matcher_cache,
                  api_key=os.environ.get("OPENAI_API_KEY"))
    return Matcher(client, judge_client.read_text(args.matcher_prompt))
