// A Node.js client of gptoss.v1: prints one JSON report of what it saw, for test_node_client.py.
// Usage: node client.mjs HOST:PORT PROTO_ROOT HEALTH_DESCRIPTOR_SET
import { readFileSync } from "node:fs";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [target, protoRoot, healthSet] = process.argv.slice(2);
const definition = protoLoader.loadSync(["gptoss/v1/inference.proto"], {
  includeDirs: [protoRoot], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
});
const gptoss = grpc.loadPackageDefinition(definition).gptoss.v1;
const client = new gptoss.Inference(target, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 60_000);

function chatWithTool() {
  return new Promise((resolve, reject) => {
    const report = { deltas: 0, channels: [], raw: 0, text: "", complete: null, requestId: null };
    const metadata = new grpc.Metadata();
    metadata.set("x-request-id", "node-chat-1");
    const call = client.Chat({
      messages: [{ role: "ROLE_USER", content: "What is the weather in Paris?" }],
      tools: [{ name: "get_weather", description: "Current weather in a city",
                parameters_json: JSON.stringify({ type: "object", properties: { city: { type: "string" } } }) }],
      reasoning_effort: "REASONING_EFFORT_LOW",
      sampling: { max_tokens: 16 },
    }, metadata, { deadline: deadline() });
    call.on("metadata", (md) => { report.requestId = md.get("x-request-id")[0] ?? null; });
    call.on("data", (message) => {
      if (message.response === "delta") {
        report.deltas += 1;
        if (!report.channels.includes(message.delta.channel)) report.channels.push(message.delta.channel);
        if (message.delta.raw) report.raw += 1;
        report.text += message.delta.text;
      } else {
        report.complete = message.complete;
      }
    });
    call.on("error", reject);
    call.on("end", () => resolve(report));
  });
}

function cancelMidway() {
  return new Promise((resolve) => {
    let chunks = 0;
    const call = client.Generate({ prompt_token_ids: [1, 2, 3], sampling: { max_tokens: 3000, ignore_stop: true } },
                                 { deadline: deadline() });
    call.on("data", () => { chunks += 1; if (chunks === 2) call.cancel(); });
    call.on("error", (err) => resolve({ chunks, code: grpc.status[err.code] }));
    call.on("end", () => resolve({ chunks, code: "OK" }));
  });
}

function health() {
  const healthDef = protoLoader.loadFileDescriptorSetFromBuffer(readFileSync(healthSet), { enums: String });
  const Health = grpc.loadPackageDefinition(healthDef).grpc.health.v1.Health;
  const stub = new Health(target, grpc.credentials.createInsecure());
  return new Promise((resolve, reject) => stub.Check({ service: "gptoss.v1.Inference" }, { deadline: deadline() },
    (err, response) => (err ? reject(err) : resolve(response.status))));
}

function invalid() {
  return new Promise((resolve) => {
    const call = client.Generate({ prompt_token_ids: [] }, { deadline: deadline() });
    call.on("data", () => {});
    call.on("error", (err) => resolve({ code: grpc.status[err.code], details: err.details,
                                        hasStatusDetails: err.metadata.get("grpc-status-details-bin").length > 0 }));
  });
}

const report = { chat: await chatWithTool(), cancel: await cancelMidway(), health: await health(),
                 invalid: await invalid() };
console.log(JSON.stringify(report));
client.close();
