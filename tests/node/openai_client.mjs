// The official `openai` npm package against the front door's HTTP API; run by
// tests/node/test_node_openai.py, which checks the JSON report this prints.
import OpenAI from "openai";

// An optional fourth argument is the temperature of every generating call (0: greedy, for a real model).
const [baseURL, apiKey, model, temperature] = process.argv.slice(2);
const sampling = temperature === undefined ? {} : { temperature: Number(temperature) };
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const tools = [{
  type: "function",
  function: {
    name: "get_weather", description: "Current weather in a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
}];
const report = {};

const chat = await client.chat.completions.create({ model, messages: [{ role: "user", content: "hi" }], ...sampling });
report.chat = { content: chat.choices[0].message.content, reasoning: chat.choices[0].message.reasoning_content,
                 usage: chat.usage };

// Streamed tool call: the arguments arrive as deltas.
const stream = await client.chat.completions.create({
  model, messages: [{ role: "user", content: "What is the weather in Paris?" }], tools, stream: true,
  stream_options: { include_usage: true }, ...sampling,
});
const call = { id: "", name: "", arguments: "", argumentDeltas: 0 };
let finish = null;
let usage = null;
for await (const chunk of stream) {
  if (chunk.usage) usage = chunk.usage;
  const choice = chunk.choices[0];
  if (!choice) continue;
  finish = choice.finish_reason ?? finish;
  for (const delta of choice.delta.tool_calls ?? []) {
    if (delta.id) { call.id = delta.id; call.name = delta.function.name; }
    if (delta.function?.arguments) { call.arguments += delta.function.arguments; call.argumentDeltas += 1; }
  }
}
report.toolCall = { ...call, finish, usage };

// The round trip: the tool's result goes back and the model answers with it.
const answer = await client.chat.completions.create({
  model, tools, ...sampling, messages: [
    { role: "user", content: "What is the weather in Paris?" },
    { role: "assistant", tool_calls: [{ id: call.id, type: "function",
                                         function: { name: call.name, arguments: call.arguments } }] },
    { role: "tool", tool_call_id: call.id, content: "18 C and sunny" },
  ],
});
report.toolAnswer = answer.choices[0].message.content;

// Responses: streamed events, then a follow-up that continues the stored response.
const events = [];
let responseId = "";
const responseStream = await client.responses.create({ model, input: "Repeat after me: green apple", stream: true, ...sampling });
for await (const event of responseStream) {
  events.push(event.type);
  if (event.type === "response.completed") responseId = event.response.id;
}
const followUp = await client.responses.create({ model, input: "Reverse: green apple", previous_response_id: responseId,
                                                 ...sampling });
report.responses = { events, followUp: followUp.output_text, usage: followUp.usage };

async function status(promise) {
  try { await promise; return { status: 200 }; } catch (err) {
    return { status: err.status, param: err.param ?? null, code: err.code ?? null,
             requestId: err.request_id ?? err.headers?.get?.("x-request-id") ?? null };
  }
}
report.errors = {
  badField: await status(client.chat.completions.create({ model, messages: [{ role: "user", content: "hi" }],
                                                         temperature: -1 })),
  unknownModel: await status(client.chat.completions.create({ model: "gpt-4o",
                                                             messages: [{ role: "user", content: "hi" }] })),
  unknownResponse: await status(client.responses.retrieve("resp_nope")),
  badKey: await status(new OpenAI({ baseURL, apiKey: "not-a-key-0123456789", maxRetries: 0 }).models.list()),
};
console.log(JSON.stringify(report));
