"""The synthetic curriculum gpt-oss-tiny learns: harmony conversations rendered by openai-harmony.

Every sample is a chat (optional developer instructions, optional function tools, a reasoning
effort, one or two user turns, maybe a tool call and its result) and the assistant messages that
answer its last turn: an analysis message, then a final answer or a tool call on the commentary
channel. Prompts go through `cluster.harmony.render_prompt`, the renderer the serving stack uses,
so the model trains on exactly the prompts it will be served; completions are rendered by
openai-harmony too (nothing here builds token strings by hand).

Skills are ones a model of a few hundred thousand trained weights learns exactly over a closed
vocabulary: repeating, reversing, counting and upper-casing words from `WORDS`, the facts in
`CAPITALS`, extracting a city or a number into a tool call, picking the declared tool that fits,
answering from a tool's result, greeting back, and saying what it can do when asked anything else. Reasoning
effort sets how much the analysis says (low < medium < high), never the answer.

`generate(n, seed)` is deterministic; train and eval sets come from different seeds (`TRAIN_SEED`,
`EVAL_SEED`), so the eval conversations are combinations the model never saw.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import openai_harmony as oh

from cluster.harmony import Message, ToolDefinition, load_tokenizer, render_prompt
from cluster.harmony.render import to_harmony

TRAIN_SEED = 0
EVAL_SEED = 1_000_003
DWELL_SEED = 12_345  # the extra conversations of the skill training dwells on at its end (train.py)

# Words whose capitals are one token too, with or without a leading space (all but "hello", kept for
# the README's exchange): upper-casing is then a token-for-token copy, as repeating is. With capitals
# of two or three tokens, the final's copy lost its place (docs/gpt-oss-tiny.md, continuations A-D).
WORDS = ("hello", "world", "green", "red", "blue", "black", "white", "light", "house", "table", "train", "cat", "dog",
         "sun", "star", "tree", "book", "road", "city", "king", "ball", "bed", "box", "car", "card", "clock", "day",
         "ear", "face", "fox", "game", "hand", "home", "ice", "key", "land", "love", "map", "room", "sea", "space",
         "window", "year", "air", "board", "body", "phone", "power")
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Greece": "Athens", "Chile": "Santiago"}
CITIES = ("Paris", "Tokyo", "Rome", "Madrid", "Berlin", "Cairo", "Ottawa", "Nairobi", "Lima", "Oslo", "Athens",
          "London", "Sydney", "Chicago", "Boston", "Denver", "Seattle", "Dublin", "Vienna", "Prague")
SKIES = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy")
EFFORTS = ("low", "medium", "high")
INSTRUCTIONS = ("You are a helpful assistant.", "Answer briefly.", "Be precise.")

CAN_DO = ("Sorry, I can't help with that. I can repeat, reverse, count or upper-case words, name the capital of "
          "a few countries, and call the tools I am given.")
GREETINGS = ("hello", "Hello!", "hi", "Hi there!", "Hey", "hey there", "Good morning", "Good evening", "Who are you?",
             "What can you do?", "Help", "hello?", "Hi, how are you?", "What are you?")
GREETING = ("Hello! I can repeat, reverse, count or upper-case words, name the capital of a few countries, and call "
            "the tools I am given.")
OOD_TOPICS = ("the sea", "love", "history", "the stars", "cooking", "football", "physics", "my cat", "winter",
              "money", "music", "the moon", "dreams", "robots", "gardens", "trains")
OOD_ASKS = ("Why is the sky blue?", "Write a poem about {t}.", "Tell me a story about {t}.", "Explain {t}.",
            "What do you think about {t}?", "Give me advice on {t}.", "Write an essay on {t}.",
            "Can you summarize {t} for me?", "Who invented {t}?", "How do I learn about {t}?",
            "Translate this into French: {w}", "What is 17 times 23?", "Tell me a joke about {t}.")

TOOLS = {
    "get_weather": ToolDefinition("get_weather", "Current weather in a city.", {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    "get_time": ToolDefinition("get_time", "Current local time in a city.", {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    "celsius_to_fahrenheit": ToolDefinition("celsius_to_fahrenheit", "Convert a temperature to Fahrenheit.", {
        "type": "object", "properties": {"celsius": {"type": "integer"}}, "required": ["celsius"]}),
    "square_root": ToolDefinition("square_root", "The square root of a number.", {
        "type": "object", "properties": {"number": {"type": "integer"}}, "required": ["number"]}),
}


@dataclass(frozen=True)
class Reply:
    """One assistant message of the target: analysis, final, or a tool call (recipient set)."""

    channel: str
    content: str
    recipient: str | None = None


@dataclass
class Sample:
    skill: str
    effort: str
    messages: list[Message]
    reply: list[Reply]
    tools: list[ToolDefinition] = field(default_factory=list)
    instructions: str | None = None
    bare: bool = False  # rendered without the system message (see _drill)

    @property
    def final(self) -> str:
        return self.reply[-1].content

    @property
    def call(self) -> tuple[str, dict] | None:
        last = self.reply[-1]
        return (last.recipient.removeprefix("functions."), json.loads(last.content)) if last.recipient else None

    def prompt_ids(self) -> list[int]:
        if self.bare:
            conversation = oh.Conversation.from_messages([to_harmony(m) for m in self.messages])
            return load_tokenizer()._encoding.render_conversation_for_completion(conversation, oh.Role.ASSISTANT)
        return render_prompt(self.messages, reasoning_effort=self.effort, tools=self.tools,
                             instructions=self.instructions)

    def completion_ids(self) -> list[int]:
        """The assistant's tokens after the prompt's `<|start|>assistant`, ending `<|return|>`/`<|call|>`."""
        enc = load_tokenizer()._encoding
        messages = [_harmony_reply(r) for r in self.reply]
        ids = [t for m in messages[:-1] for t in enc.render(m)]
        # rendered "for training", the last message ends in <|return|> (final) or <|call|> (tool call)
        ids += enc.render_conversation_for_training(oh.Conversation.from_messages(messages[-1:]))
        head = enc.render(oh.Message.from_role_and_content(oh.Role.ASSISTANT, ""))[:2]  # <|start|>assistant
        assert ids[:2] == head, "an assistant message must start with <|start|>assistant"
        return ids[2:]


def _harmony_reply(reply: Reply) -> oh.Message:
    message = oh.Message.from_role_and_content(oh.Role.ASSISTANT, reply.content).with_channel(reply.channel)
    if reply.recipient:
        message = message.with_recipient(reply.recipient).with_content_type("<|constrain|>json")
    return message


def _analysis(effort: str, intent: str, core: str) -> Reply:
    """Low says only the core reasoning; medium adds the user's intent; high also a check."""
    parts = {"low": [core], "medium": [intent, core],
             "high": [intent, core, "I will double-check it and answer with exactly that."]}[effort]
    return Reply("analysis", " ".join(p for p in parts if p))


def _words(rng: random.Random, lo: int = 1, hi: int = 6) -> list[str]:
    """Distinct words: a model this small copies by looking up where the word it just wrote stands in
    the user's text and taking its neighbour, which is ambiguous when a word occurs twice."""
    return rng.sample(WORDS, rng.randint(lo, hi))


# ---- skills: each returns (skill, user text, replies, tools) for the last user turn -----------------


def _repeat(rng, effort):
    w = " ".join(_words(rng))
    ask = rng.choice(("Repeat after me: {}", "Say this back: {}", "Echo: {}", "Please repeat: {}"))
    return "repeat", ask.format(w), [_analysis(effort, "The user wants the text repeated.", f"Repeat: {w}"),
                                     Reply("final", w)]


def _reverse(rng, effort):
    ws = _words(rng, 2, 6)
    ask = rng.choice(("Reverse the words: {}", "Say these words backwards: {}", "Reverse: {}"))
    text, rev = " ".join(ws), " ".join(reversed(ws))
    # The words written out first put the last one right before "Last word first:" and each next one a
    # few tokens back, nearer than in the user's text (docs/gpt-oss-tiny.md, the eighth run).
    return "reverse", ask.format(text), [
        _analysis(effort, "The user wants the word order reversed.", f"The words: {text}. Last word first: {rev}"),
        Reply("final", rev)]


def _count(rng, effort):
    ws = _words(rng, 1, 8)
    ask = rng.choice(("How many words are in: {}", "Count the words: {}", "Word count: {}"))
    listing = ", ".join(f"{i + 1} {w}" for i, w in enumerate(ws))
    return "count", ask.format(" ".join(ws)), [
        _analysis(effort, "The user wants the number of words.", f"Counting: {listing}."), Reply("final", str(len(ws)))]


def _upper(rng, effort):
    w = " ".join(_words(rng))
    ask = rng.choice(("Upper-case this: {}", "Make this uppercase: {}", "Shout: {}"))
    return "upper", ask.format(w), [
        _analysis(effort, "The user wants upper case.", f"In capitals: {w.upper()}"), Reply("final", w.upper())]


def _fact(rng, effort):
    country = rng.choice(list(CAPITALS))
    ask = rng.choice(("What is the capital of {}?", "Name the capital of {}.", "capital of {}?", "Which city is the capital of {}?"))
    city = CAPITALS[country]
    return "fact", ask.format(country), [
        _analysis(effort, "The user asks for a capital.", f"The capital of {country} is {city}."),
        Reply("final", f"The capital of {country} is {city}.")]


def _out_of_scope(rng, effort):
    ask = rng.choice(OOD_ASKS).format(t=rng.choice(OOD_TOPICS), w=" ".join(_words(rng, 1, 3)))
    return "decline", ask, [_analysis(effort, "The user asks for something else.", "That is outside what I can do."),
                            Reply("final", CAN_DO)]


def _greet(rng, effort):
    return "greet", rng.choice(GREETINGS), [_analysis(effort, "The user greets me.", "Say hello and what I can do."),
                                          Reply("final", GREETING)]


def _tool_ask(rng) -> tuple[str, str, dict]:
    """(tool name, user text, arguments)."""
    name = rng.choice(list(TOOLS))
    city = rng.choice(CITIES)
    if name == "get_weather":
        text = rng.choice(("What is the weather in {c}?", "How is the weather in {c} today?", "Weather for {c}, please."))
        return name, text.format(c=city), {"city": city}
    if name == "get_time":
        text = rng.choice(("What time is it in {c}?", "Tell me the local time in {c}.", "Current time in {c}?"))
        return name, text.format(c=city), {"city": city}
    n = rng.randint(0, 100)
    if name == "celsius_to_fahrenheit":
        text = rng.choice(("Convert {n} degrees Celsius to Fahrenheit.", "What is {n} C in Fahrenheit?", "{n} Celsius in Fahrenheit?"))
        return name, text.format(n=n), {"celsius": n}
    text = rng.choice(("What is the square root of {n}?", "Square root of {n}?", "Compute the square root of {n}."))
    return name, text.format(n=n), {"number": n}


def _declared(rng, needed: str | None) -> list[ToolDefinition]:
    names = [n for n in TOOLS if n != needed]
    chosen = rng.sample(names, rng.randint(0 if needed else 1, 2)) + ([needed] if needed else [])
    rng.shuffle(chosen)
    return [TOOLS[n] for n in chosen]


def _tool_result(rng, name: str, args: dict) -> tuple[str, str]:
    """(tool output JSON, the final answer built from it)."""
    if name == "get_weather":
        t, sky = rng.randint(-10, 35), rng.choice(SKIES)
        return json.dumps({"temperature_c": t, "sky": sky}), f"It is {t}°C and {sky} in {args['city']}."
    if name == "get_time":
        hh, mm = rng.randint(0, 23), rng.randint(0, 59)
        return json.dumps({"time": f"{hh:02d}:{mm:02d}"}), f"It is {hh:02d}:{mm:02d} in {args['city']}."
    if name == "celsius_to_fahrenheit":
        f = round(args["celsius"] * 9 / 5 + 32)
        return json.dumps({"fahrenheit": f}), f"{args['celsius']}°C is {f}°F."
    r = round(args["number"] ** 0.5, 2)
    return json.dumps({"result": r}), f"The square root of {args['number']} is {r}."


SIMPLE_SKILLS = (_repeat, _reverse, _count, _upper, _fact, _out_of_scope)
SKILLS = ("repeat", "reverse", "count", "upper", "fact", "decline", "greet", "tool_call", "tool_choice",
          "tool_answer")
# A greeting is one fixed answer, cheap to learn; without it "hello" alone got a call to whatever tool the
# model saw most. Kept rare so it takes little from the skills that need practice.
GREET_SHARE = 0.06


COPYING_SKILLS = (_repeat, _reverse, _count, _upper)
DRILL_SHARE = 0.25  # conversations of many copying turns: dense copying is what teaches it
DRILL_TURNS = (2, 8)


def _earlier_turns(rng: random.Random, effort: str, skills, count: int) -> list[Message]:
    """`count` finished turns of `skills`: the user's ask and the assistant's final answer."""
    turns: list[Message] = []
    for _ in range(count):
        _, text, reply = rng.choice(skills)(rng, effort)
        turns += [Message("user", text), Message("assistant", reply[-1].content, channel="final")]
    return turns


def _drill(rng: random.Random, effort: str) -> Sample:
    """A chat of copying turns and nothing else: no system message (openai-harmony renders the
    conversation as it is), their answers trained too (see train.earlier_answers). Copying from far
    back is learned slowly behind the long system and developer messages; in these short, dense
    chats it is learned quickly, and the skill then carries over to the full prompts."""
    history = _earlier_turns(rng, effort, COPYING_SKILLS, rng.randint(*DRILL_TURNS))
    skill, text, reply = rng.choice(COPYING_SKILLS)(rng, effort)
    return Sample(skill, effort, history + [Message("user", text)], reply, bare=True)


def sample(rng: random.Random) -> Sample:
    effort = rng.choice(EFFORTS)
    instructions = rng.choice((None, None) + INSTRUCTIONS)
    if rng.random() < DRILL_SHARE:
        return _drill(rng, effort)
    # earlier, finished turns: the model must answer the latest one (their answers are trained too)
    history = _earlier_turns(rng, effort, SIMPLE_SKILLS[:5], rng.choices((0, 1, 2, 3), weights=(4, 3, 2, 1))[0])
    kind = rng.random()
    if kind < 0.5:
        skill, text, reply = (_greet if rng.random() < GREET_SHARE else rng.choice(SIMPLE_SKILLS))(rng, effort)
        tools = _declared(rng, None) if rng.random() < 0.3 else []  # tools declared but not needed
        return Sample(skill, effort, history + [Message("user", text)], reply, tools, instructions)
    name, text, args = _tool_ask(rng)
    tools = _declared(rng, name)
    call = Reply("commentary", json.dumps(args), recipient=f"functions.{name}")
    think = _analysis(effort, "The user needs a tool.", f"Call {name} with {json.dumps(args)}.")
    messages = history + [Message("user", text)]
    if kind < 0.78:
        skill = "tool_choice" if len(tools) > 1 else "tool_call"
        return Sample(skill, effort, messages, [think, call], tools, instructions)
    output, answer = _tool_result(rng, name, args)
    # harmony asks clients to send the call's analysis back with the result, but Chat Completions
    # clients usually drop it: the model learns to answer either way
    sent_back = [Message("assistant", think.content, channel="analysis")] if rng.random() < 0.5 else []
    messages += sent_back + [Message("assistant", call.content, channel="commentary", recipient=call.recipient,
                                     content_type="<|constrain|>json"),
                             Message("tool", output, name=call.recipient)]
    final_think = _analysis(effort, "The tool answered.", f"Report the result: {answer}")
    return Sample("tool_answer", effort, messages, [final_think, Reply("final", answer)], tools, instructions)


def generate(n: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    return [sample(rng) for _ in range(n)]


def of_skills(counts: dict[str, int], seed: int) -> list[Sample]:
    """The first `counts[skill]` conversations of each skill among those `seed` draws, skill after
    skill in the order of `counts`: each skill alone, in the curriculum's own contexts (drills,
    earlier turns, tools declared). One pass over the draws for all of them."""
    rng = random.Random(seed)
    found: dict[str, list[Sample]] = {skill: [] for skill in counts}
    while any(len(found[skill]) < n for skill, n in counts.items()):
        s = sample(rng)
        if s.skill in found and len(found[s.skill]) < counts[s.skill]:
            found[s.skill].append(s)
    return [s for skill in counts for s in found[skill]]
