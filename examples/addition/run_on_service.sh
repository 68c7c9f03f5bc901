#!/usr/bin/env bash
# The addition example as a job on a running service (`make serve`), with curl only.
# Needs PREFIX_RFT_API_KEY (printed by the first `prefix-rft serve`) and the example data
# (python examples/addition/make_data.py). Same steps as the README's walk-through.
set -euo pipefail
cd "$(dirname "$0")"
API="${PREFIX_RFT_API_URL:-http://127.0.0.1:8000}"
AUTH="Authorization: Bearer ${PREFIX_RFT_API_KEY:?set PREFIX_RFT_API_KEY to the key printed by prefix-rft serve}"
field() { python3 -c "import json, sys; print(json.load(sys.stdin)$1)"; }

upload() { curl -sf -H "$AUTH" -F file=@"$1" -F purpose=fine-tune "$API/v1/files" | field "['id']"; }
train=$(upload train.jsonl)
heldout=$(upload eval.jsonl)
echo "files: $train (train), $heldout (held-out)"

job=$(curl -sf -H "$AUTH" -H "Content-Type: application/json" "$API/v1/fine_tuning/jobs" -d @- <<JSON | field "['id']"
{
  "model": "smollm2-135m-instruct",
  "training_file": "$train",
  "validation_file": "$heldout",
  "method": {"type": "prefix_rft", "prefix_rft": {
    "grader": {"type": "numeric", "name": "correct", "extract": "last_number"},
    "hyperparameters": {"steps": 20, "prompts_per_step": 4, "rollouts_per_prompt": 8,
                        "max_completion_tokens": 64, "eval_interval": 10, "eval_samples": 100}
  }},
  "suffix": "addition"
}
JSON
)
echo "job: $job"

while true; do
  state=$(curl -sf -H "$AUTH" "$API/v1/fine_tuning/jobs/$job")
  status=$(field "['status']" <<<"$state")
  step=$(field "['step']" <<<"$state")
  echo "$(date +%T) $status, step $step/20"
  case "$status" in succeeded|failed|cancelled) break ;; esac
  sleep 15
done
# Events come newest first; printed here in the order they happened.
curl -sf -H "$AUTH" "$API/v1/fine_tuning/jobs/$job/events?limit=100" | python3 -c "
import json, sys
for e in reversed(json.load(sys.stdin)['data']): print(e['created_at'], e['message'])"
[ "$status" = succeeded ] || exit 1

curl -sf -H "$AUTH" -D headers.txt -o adapter.tar.gz "$API/v1/fine_tuning/jobs/$job/adapter"
expected=$(grep -i '^x-content-sha256:' headers.txt | awk '{print $2}' | tr -d '\r')
echo "$expected  adapter.tar.gz" | sha256sum -c -
mkdir -p "runs/$job" && tar -xzf adapter.tar.gz -C "runs/$job" && rm adapter.tar.gz headers.txt
echo "adapter in examples/addition/runs/$job/adapter"

# The trained adapter answers at once through the OpenAI-compatible endpoint.
model=$(curl -sf -H "$AUTH" "$API/v1/fine_tuning/jobs/$job" | field "['fine_tuned_model']")
curl -sf -H "$AUTH" -H 'Content-Type: application/json' "$API/v1/chat/completions" -d "{
  \"model\": \"$model\",
  \"messages\": [{\"role\": \"user\", \"content\": \"What is 27 + 38?\"}],
  \"max_tokens\": 64, \"temperature\": 0
}" | python3 -c "
import json, sys
reply = json.load(sys.stdin)
print(reply['model'] + ':', reply['choices'][0]['message']['content'])"
