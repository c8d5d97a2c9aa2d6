import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { getOrCreateSandbox } from "hive";

// A project folder on the host, with a secret the sandbox must not see.
const project = mkdtempSync(join(tmpdir(), "hive-project-"));
mkdirSync(join(project, "docs"));
writeFileSync(join(project, ".env"), "API_KEY=do-not-read\n");
writeFileSync(join(project, "docs", "guide.md"), "# Guide\n");

const sandbox = await getOrCreateSandbox("file-access", {
  fs: [
    {
      backend: "local",
      mount: "/workspace",
      source: project,
      acls: [
        { path: "/workspace/**/*.env", access: "none" }, // hidden, wherever they are
        { path: "/workspace/docs/**", access: "r" }, // read-only
        { path: "/workspace/**", access: "rw" }, // everything else
      ],
    },
    { backend: "local", mount: "/scratch" }, // no acls: the whole mount is rw
  ],
});
const events = sandbox.getEventsStream();

console.log((await sandbox.exec("ls -A /workspace")).stdout); // docs (no .env)
console.log((await sandbox.exec("cat /workspace/.env")).stderr); // No such file or directory
console.log((await sandbox.exec("echo x >> /workspace/docs/guide.md")).stderr); // Permission denied
console.log((await sandbox.exec("echo done > /workspace/notes.txt && cat /workspace/notes.txt")).stdout);

await sandbox.close();
for await (const event of events) {
  if (event.type === "fs.denied") console.log("denied:", event.operation, event.path, "rule", event.rule);
}
