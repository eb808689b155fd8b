#!/bin/bash
# Health probe of Kindling's container images: GET /health/ready on the
# daemon's port through bash's /dev/tcp (the images carry no HTTP client).
# Exit 0 when the daemon answers 200; 503 (draining) or no answer is unhealthy.
port=${PORT:-8080}
exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
printf 'GET /health/ready HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
read -r -t 5 _ status _ <&3 || exit 1
[[ $status == 200 ]]
