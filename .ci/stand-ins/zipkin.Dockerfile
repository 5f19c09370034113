# Stand-in for openzipkin/zipkin: the project's strict test receiver of Zipkin's v2 span API,
# with the read side of the API the workshop and the stack test use (see zipkin_stand_in.py).
ARG BASE
FROM ${BASE}
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY zipkin_receiver.py zipkin_stand_in.py /opt/zipkin/
USER nobody
EXPOSE 9411
CMD ["python", "/opt/zipkin/zipkin_stand_in.py"]
