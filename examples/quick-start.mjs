import { getOrCreateSandbox } from "hive";

const sandbox = await getOrCreateSandbox("quick-start", {
  egress: [{ access: "allow", host: "api.github.com", methods: ["GET"] }],
});
const events = sandbox.getEventsStream(); // every event from now on

const zen = await sandbox.exec(["curl", "-s", "https://api.github.com/zen"]);
console.log("api.github.com:", zen.exitCode, zen.stdout);

const post = await sandbox.exec(["curl", "-s", "-X", "POST", "https://api.github.com/gists"]);
console.log("POST:", post.stdout); // a 403 from hive's proxy, saying which rule denied it

await sandbox.close(); // ends the event stream once it has delivered what happened
for await (const event of events) {
  if (event.type === "egress.request") {
    console.log(event.access, event.method, `${event.host}${event.path}`, event.reason);
  }
}
