import { getOrCreateSandbox } from "hive";

const sandbox = await getOrCreateSandbox("audit-log", {
  egress: [{ access: "allow", host: "api.github.com" }],
});

// A live subscriber: sees every event from the moment of the call.
const live = (async () => {
  const denied = [];
  for await (const event of sandbox.getEventsStream()) {
    if (event.type === "egress.request" && event.access === "denied") denied.push(`${event.method} ${event.host}${event.path}`);
    if (event.type === "process.exit") break; // breaking out unsubscribes
  }
  return denied;
})();
await sandbox.exec("curl -s https://api.github.com/zen; curl -s https://example.com/; true");
console.log("denied while running:", await live);

// A replay: the persisted audit log first (from its start, or after an event id), then live events.
let last = "";
for await (const event of sandbox.getEventsStream({ since: "start" })) {
  last = event.id;
  if (event.type === "process.exit") break;
}
console.log("last event id replayed:", last);
await sandbox.close();
